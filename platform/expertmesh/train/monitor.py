"""The run directory's record files, the metrics buffer workers publish to, and the loss plot.

Workers (rank 0) publish records to a :class:`MetricsBuffer` (a Ray actor in a cluster run,
see ``trainer.py``); the driver drains it about twice a second and appends each record to
the run directory, where the CLI's progress bar and people read them::

    <out>/metrics.jsonl       every record, one JSON object per line, in arrival order
    <out>/expert_load.jsonl   the "expert_load" records only (they feed expert placement)
    <out>/loss_curve.png      training loss and validation loss per step (matplotlib, Agg)
    <out>/run.json            the spec and the final result of the last ``train`` call

Record kinds (all carry ``kind`` and ``time``, wall-clock seconds):

- ``start``: a worker group started; ``world_size``, ``step`` it starts at, ``restore``
  (``null`` | ``"deepspeed"`` | ``"consolidated"``), ``global_batch``, ``pid`` of rank 0.
- ``step``: ``step``, ``loss``, ``lm_loss``, ``lr``, ``tokens``, ``tokens_per_s``,
  ``step_time_s``, ``balance_max_over_mean`` (of this step's load, averaged over layers).
- ``expert_load``: ``step``, ``steps`` (interval), ``layers`` (layer indices),
  ``tokens_per_expert`` ``[L][E]`` summed over workers and the interval, ``max_over_mean`` ``[L]``.
- ``eval``: ``step``, ``val_loss`` (nats/token on the held-out split).
- ``checkpoint``: ``step`` (the checkpoint is registered once the step's report returns).

After a restart the steps since the last checkpoint are recorded twice; readers keep the
last record per step (:func:`loss_history`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_SUMMARY_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"


class MetricsBuffer:
    """Records in arrival order until drained. Thread-safe; wrapped as a Ray actor by the trainer."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def put(self, records: list[dict[str, Any]]) -> None:
        """Append records (a worker's publish)."""
        with self._lock:
            self._records.extend(records)

    def drain(self) -> list[dict[str, Any]]:
        """Everything put since the last drain."""
        with self._lock:
            out, self._records = self._records, []
        return out


@dataclass(frozen=True)
class RunFiles:
    """Paths of a run directory's files."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def expert_load(self) -> Path:
        return self.root / EXPERT_LOAD_FILE

    @property
    def loss_curve(self) -> Path:
        return self.root / LOSS_CURVE_FILE

    @property
    def summary(self) -> Path:
        return self.root / RUN_SUMMARY_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def ray_storage(self) -> Path:
        """Ray Train's ``storage_path`` (its run folders and checkpoints live below)."""
        return self.root / "ray"

    @property
    def staging(self) -> Path:
        """Where workers stage checkpoint parts before Ray Train persists them (emptied after a run)."""
        return self.root / "staging"

    @property
    def cache(self) -> Path:
        """Default tokenizer/token cache when none is given."""
        return self.root / "cache"


@dataclass
class RunLog:
    """Appends records to the run files and keeps what the progress display needs."""

    files: RunFiles
    records: list[dict[str, Any]] = field(default_factory=list)

    def append(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write records to ``metrics.jsonl`` (and ``expert_load.jsonl``); returns them as a list."""
        batch = list(records)
        if not batch:
            return batch
        self.files.root.mkdir(parents=True, exist_ok=True)
        with self.files.metrics.open("a", encoding="utf-8") as metrics:
            for record in batch:
                metrics.write(json.dumps(record) + "\n")
        loads = [r for r in batch if r.get("kind") == "expert_load"]
        if loads:
            with self.files.expert_load.open("a", encoding="utf-8") as handle:
                for record in loads:
                    handle.write(json.dumps(record) + "\n")
        self.records.extend(batch)
        return batch


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a ``.jsonl`` file (a torn last line, from a crash mid-write, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass(frozen=True)
class LossHistory:
    """Per-step losses with the last record per step kept (restarts re-run steps)."""

    steps: list[int]
    losses: list[float]
    val_steps: list[int]
    val_losses: list[float]


def loss_history(records: Iterable[dict[str, Any]]) -> LossHistory:
    """Training and validation loss by step from a record stream."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for record in records:
        if record.get("kind") == "step":
            train[int(record["step"])] = float(record["loss"])
        elif record.get("kind") == "eval":
            val[int(record["step"])] = float(record["val_loss"])
    steps = sorted(train)
    val_steps = sorted(val)
    return LossHistory(steps, [train[s] for s in steps], val_steps, [val[s] for s in val_steps])


def plot_loss_curve(records: Iterable[dict[str, Any]], path: Path, baseline_nats: float | None = None,
                    title: str = "training loss") -> Path | None:
    """Save the loss curve PNG (None when there is no step record yet)."""
    history = loss_history(records)
    if not history.steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=110)
    ax.plot(history.steps, history.losses, label="train loss", linewidth=1.0, alpha=0.8)
    if history.val_steps:
        ax.plot(history.val_steps, history.val_losses, "o-", label="validation loss", markersize=3)
    if baseline_nats is not None:
        ax.axhline(baseline_nats, color="gray", linestyle="--", linewidth=1.0,
                   label=f"unigram baseline ({baseline_nats:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class ProgressState:
    """The latest values the CLI shows (step, loss, tokens/s, balance, validation loss)."""

    step: int = 0
    end_step: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    balance: float | None = None
    val_loss: float | None = None
    world_size: int | None = None
    restarts: int = 0
    starts: int = 0

    def update(self, record: dict[str, Any]) -> None:
        """Fold one record in."""
        kind = record.get("kind")
        if kind == "start":
            self.starts += 1
            self.restarts = max(0, self.starts - 1)
            self.world_size = record.get("world_size")
            self.step = int(record.get("step", self.step))
            self.end_step = int(record.get("end_step", self.end_step))
        elif kind == "step":
            self.step = int(record["step"])
            self.loss = float(record["loss"])
            self.tokens_per_s = float(record["tokens_per_s"])
            self.balance = float(record["balance_max_over_mean"])
        elif kind == "eval":
            self.val_loss = float(record["val_loss"])
