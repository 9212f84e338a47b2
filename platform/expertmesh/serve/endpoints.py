"""Endpoints: what an operator asks for (:class:`EndpointSpec`), how a model reference becomes
a checkpoint directory, and the registry in Redis (the desired state ``up`` redeploys).

Endpoint names are per tenant: tenant ``acme``'s endpoint ``chat`` is the Ray Serve
application ``ep.acme.chat`` and is invisible to every other tenant (they get 404).

Redis keys::

    em:endpoint:T:N     string  the EndpointRecord as JSON
    em:endpoints        set     "T/N" of every endpoint
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expertmesh.jobs.model import JobState, is_job_id
from expertmesh.jobs.store import JobStore
from expertmesh.store import key
from expertmesh.tenants.registry import NAME_RULE, check_name


class EndpointError(ValueError):
    """An endpoint request that cannot be done as asked."""


class EndpointNotFound(EndpointError):
    pass


class EndpointSpec(BaseModel):
    """An endpoint as the operator asks for it (``POST /admin/endpoints``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=NAME_RULE)
    tenant: str
    model: str = Field(min_length=1, max_length=4096, description="checkpoint DIR, a JOB_ID, or 'demo'")
    min_replicas: int = Field(default=1, ge=0, le=64)
    max_replicas: int = Field(default=1, ge=1, le=64)
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=1000,
                                           description="autoscaling target: requests in flight per replica")
    max_ongoing_requests: int = Field(default=8, ge=1, le=1000, description="per replica; more wait in the queue")
    max_queued_requests: int = Field(default=16, ge=-1, le=100_000,
                                     description="per gateway replica; beyond it requests get 503 (-1: unbounded)")
    max_num_seqs: int = Field(default=8, ge=1, le=1024, description="engine batch size")
    kv_cache_dtype: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    num_cpus: float = Field(default=1.0, gt=0, le=256, description="CPUs reserved per replica")
    torch_threads: int = Field(default=1, ge=1, le=256)
    upscale_delay_s: float = Field(default=2.0, ge=0, le=3600)
    downscale_delay_s: float = Field(default=20.0, ge=0, le=3600)
    health_check_period_s: float = Field(default=10.0, gt=0, le=3600)

    @field_validator("name", "tenant")
    @classmethod
    def _names(cls, v: str, info) -> str:
        return check_name(v, "endpoint" if info.field_name == "name" else "tenant")

    @model_validator(mode="after")
    def _replicas(self) -> EndpointSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}")
        return self


@dataclass(frozen=True)
class ModelInfo:
    path: str
    max_model_len: int
    vocab_size: int
    has_tokenizer: bool


def inspect_checkpoint(path: Path) -> ModelInfo:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EndpointError(f"{path} is not a checkpoint directory: config.json not found")
    from expertmesh.model.checkpoint_check import CheckMode, CheckpointInvalid, require_valid_checkpoint

    try:  # a corrupted or partial checkpoint is refused before any replica loads it
        require_valid_checkpoint(path, CheckMode.DEEP)
    except CheckpointInvalid as exc:
        raise EndpointError(str(exc)) from None
    try:
        config = json.loads(config_file.read_text())
        return ModelInfo(str(path.resolve()), int(config["max_position_embeddings"]), int(config["vocab_size"]),
                         (path / "tokenizer.json").is_file())
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"{config_file} is not a usable model config: {exc}") from None


def resolve_model(ref: str, jobs: JobStore, home: Path, tenant: str) -> ModelInfo:
    """``demo`` → the demo checkpoint; ``job-…`` → that (succeeded, same tenant) job's
    checkpoint; anything else → a checkpoint directory on storage the cluster sees."""
    if ref == "demo":
        path = home / "runs" / "demo" / "checkpoint"
        if not (path / "config.json").is_file():
            raise EndpointError(f"the demo model is not trained yet ({path} is missing): submit the demo job "
                                f"(`expertmesh jobs submit --preset demo --tenant {tenant}`) and deploy its JOB_ID, "
                                f"or run `expertmesh demo` once")
        return inspect_checkpoint(path)
    if is_job_id(ref):
        job = jobs.get(ref)
        if job is None or job.tenant != tenant:
            raise EndpointError(f"job {ref!r} does not exist for tenant {tenant!r}")
        if job.state is not JobState.SUCCEEDED or not job.checkpoint:
            raise EndpointError(f"job {ref} has no checkpoint yet (state {job.state.value}); deploy it once it "
                                f"has succeeded")
        return inspect_checkpoint(Path(job.checkpoint))
    return inspect_checkpoint(Path(ref).expanduser())


@dataclass(frozen=True)
class EndpointRecord:
    spec: EndpointSpec
    model: ModelInfo
    created_at: float

    @property
    def app_name(self) -> str:
        return app_name(self.spec.tenant, self.spec.name)

    def to_json(self) -> str:
        return json.dumps({"spec": self.spec.model_dump(), "model": self.model.__dict__,
                           "created_at": self.created_at})

    @classmethod
    def from_json(cls, text: str) -> EndpointRecord:
        raw = json.loads(text)
        return cls(EndpointSpec(**raw["spec"]), ModelInfo(**raw["model"]), float(raw["created_at"]))

    def to_dict(self) -> dict:
        return {**self.spec.model_dump(), "app_name": self.app_name, "model_path": self.model.path,
                "max_model_len": self.model.max_model_len, "has_tokenizer": self.model.has_tokenizer,
                "created_at": self.created_at}


def app_name(tenant: str, name: str) -> str:
    return f"ep.{tenant}.{name}"


class EndpointRegistry:
    def __init__(self, client: redis.Redis):
        self.client = client

    def put(self, record: EndpointRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key("endpoint", record.spec.tenant, record.spec.name), record.to_json())
        pipe.sadd(key("endpoints"), f"{record.spec.tenant}/{record.spec.name}")
        pipe.execute()

    def create(self, spec: EndpointSpec, model: ModelInfo, replace: bool = False) -> EndpointRecord:
        record = EndpointRecord(spec, model, time.time())
        if not replace and self.client.exists(key("endpoint", spec.tenant, spec.name)):
            raise EndpointError(f"endpoint {spec.name!r} already exists for tenant {spec.tenant!r}")
        self.put(record)
        return record

    def get(self, tenant: str, name: str) -> EndpointRecord | None:
        if not name or ":" in name or not tenant:
            return None
        text = self.client.get(key("endpoint", tenant, name))
        return EndpointRecord.from_json(text) if text else None

    def require(self, tenant: str, name: str) -> EndpointRecord:
        record = self.get(tenant, name)
        if record is None:
            raise EndpointNotFound(f"endpoint {name!r} does not exist for tenant {tenant!r}")
        return record

    def list(self, tenant: str | None = None) -> list[EndpointRecord]:
        names = sorted(self.client.smembers(key("endpoints")))
        records = []
        for entry in names:
            t, n = entry.split("/", 1)
            if tenant is None or t == tenant:
                record = self.get(t, n)
                if record is not None:
                    records.append(record)
        return records

    def delete(self, tenant: str, name: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key("endpoint", tenant, name))
        pipe.srem(key("endpoints"), f"{tenant}/{name}")
        pipe.execute()
