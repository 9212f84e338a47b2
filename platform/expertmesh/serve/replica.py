"""One endpoint replica: the single-process engine (``LLM``) for one checkpoint.

The gateway sends requests already validated and tokenized::

    {"prompt": [token ids], "params": {SamplingParams fields}, "trace": {"traceparent": ...}}

``generate`` streams events (one per engine step that produced a token), ``complete``
returns the whole result in one message (what non-streaming requests use, so a long
completion is one Ray message, not one per token)::

    {"token_ids": [...], "text": "...", "finish_reason": None | "stop" | "length"}
    {"error": "message"}          # the engine refused the input (answered as a 400)

Several concurrent requests share the engine's continuous batches. Under Ray Serve this
class is the deployment (see ``backend.ServeBackend``); ``backend.LocalBackend`` runs the
same class in-process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from expertmesh.serve.endpoints import EndpointRecord
from expertmesh.telemetry import TelemetryConfig, extract_context, setup_telemetry


class EndpointServer:
    def __init__(self, record_json: str, telemetry_config: dict[str, Any] | None = None, tracer: Any = None):
        import torch

        from expertmesh.engine import LLM

        self.record = EndpointRecord.from_json(record_json)
        spec = self.record.spec
        torch.set_num_threads(spec.torch_threads)
        self.llm = LLM(self.record.model.path, kv_cache_dtype=spec.kv_cache_dtype, max_num_seqs=spec.max_num_seqs)
        config = TelemetryConfig(**(telemetry_config or {"service_name": "expertmesh-endpoint", "prometheus": False}))
        self.tracer = tracer if tracer is not None else setup_telemetry(config).tracer

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        # not start_as_current_span: this generator may be closed from another task, and a
        # context attached here could not be detached there
        span = self.tracer.start_span("endpoint.generate", context=extract_context(request.get("trace")))
        span.set_attribute("expertmesh.endpoint", self.record.app_name)
        span.set_attribute("expertmesh.prompt_tokens", len(request["prompt"]))
        produced = 0
        try:
            async for out in self.llm.stream(request["prompt"], request["params"]):
                produced += len(out.new_token_ids)
                yield {"token_ids": out.new_token_ids, "text": out.text_delta,
                       "finish_reason": out.finish_reason if out.finished else None}
        except ValueError as exc:  # bad input: the engine checked it before doing anything
            span.set_attribute("expertmesh.error", str(exc))
            yield {"error": str(exc)}
        finally:
            span.set_attribute("expertmesh.completion_tokens", produced)
            span.end()

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        token_ids: list[int] = []
        text: list[str] = []
        finish = None
        async for event in self.generate(request):
            if "error" in event:
                return event
            token_ids += event["token_ids"]
            text.append(event["text"])
            finish = event["finish_reason"] or finish
        return {"token_ids": token_ids, "text": "".join(text), "finish_reason": finish}

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        task = self.llm._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")
