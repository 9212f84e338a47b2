"""``expertmesh train (SPEC | --preset demo) [--steps N] [--workers N] [--out DIR]``.

Runs :func:`expertmesh.train.trainer.train` with a progress bar fed by the run's records
(the workers run in other processes; they publish to a buffer the driver drains), then prints
where the serving checkpoint is, the validation loss against the unigram baseline, and a
greedy sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from expertmesh import paths
from expertmesh.cli import CLIError, app

SAMPLE_PROMPT = "    def __init__(self"
SAMPLE_TOKENS = 60


def _info(fields: dict[str, Any]) -> str:
    parts = []
    if fields.get("loss") is not None:
        parts.append(f"loss {fields['loss']:.3f}")
    if fields.get("val_loss") is not None:
        parts.append(f"val {fields['val_loss']:.3f}")
    if fields.get("tokens_per_s") is not None:
        parts.append(f"{fields['tokens_per_s']:,.0f} tok/s")
    if fields.get("balance") is not None:
        parts.append(f"max/mean load {fields['balance']:.2f}")
    if fields.get("world_size") is not None:
        parts.append(f"{fields['world_size']} worker(s)")
    return "  ".join(parts)


@app.command("train")
def train_command(
    spec_path: Path | None = typer.Argument(None, metavar="SPEC", help="Training spec file (YAML or JSON)."),
    preset_name: str | None = typer.Option(None, "--preset", help="Built-in spec instead of a file: demo or tiny."),
    steps: int | None = typer.Option(None, "--steps", help="Override the spec's number of steps."),
    workers: int | None = typer.Option(None, "--workers", help="Override the spec's number of workers."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: $EXPERTMESH_HOME/runs/<spec name>, "
                                                        "~/.expertmesh/runs/<spec name>); an existing run there "
                                                        "is resumed."),
    sample: bool = typer.Option(True, "--sample/--no-sample", help="Print a greedy sample at the end."),
    ray_address: str | None = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                           help="Ray cluster to run on (default: a private local instance)."),
) -> None:
    """Train a model on Ray Train + DeepSpeed and export a serving checkpoint."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from expertmesh.train.spec import load_spec, preset
    from expertmesh.train.trainer import available_cpus, greedy_sample, preflight, resolve_spec, train

    if (spec_path is None) == (preset_name is None):
        raise CLIError("give a spec file or --preset NAME (exactly one)")
    spec = load_spec(spec_path) if spec_path is not None else preset(str(preset_name))
    spec = resolve_spec(spec, workers=workers, steps=steps)
    if ray_address is None:
        preflight(spec, available_cpus())  # before the progress bar: errors are one line
    # default: $EXPERTMESH_HOME/runs/<name>, so `--preset demo` yields the checkpoint `make run` serves
    run_dir = out if out is not None else paths.home() / "runs" / spec.name
    console = Console(stderr=True)
    fields: dict[str, Any] = {}
    with Progress(TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting Ray and the workers...", total=spec.steps)

        def on_record(record: dict[str, Any]) -> None:
            kind = record.get("kind")
            if kind == "start":
                fields["world_size"] = record.get("world_size")
                if record.get("restore"):
                    progress.console.print(f"resumed at step {record['step']} ({record['restore']}: "
                                           f"{record.get('restore_reason')})")
                progress.update(task, total=record.get("end_step"), completed=record.get("step", 0))
            elif kind == "step":
                fields.update(loss=record["loss"], tokens_per_s=record["tokens_per_s"],
                              balance=record["balance_max_over_mean"])
                progress.update(task, completed=record["step"])
            elif kind == "eval":
                fields["val_loss"] = record["val_loss"]
            elif kind == "checkpoint":
                progress.console.print(f"checkpoint at step {record['step']}")
            progress.update(task, description=_info(fields))

        result = train(spec, run_dir, on_record=on_record, ray_address=ray_address)
    typer.echo(f"checkpoint: {result.checkpoint_dir}")
    if result.val_loss is not None:
        typer.echo(f"validation loss {result.val_loss:.3f} nats/token "
                   f"(unigram baseline {result.unigram_baseline_nats:.3f}) after {result.final_step} steps "
                   f"in {result.elapsed_s / 60:.1f} min, {result.restarts} restart(s)")
    if result.loss_curve_path is not None:
        typer.echo(f"loss curve: {result.loss_curve_path}")
    if sample:
        typer.echo("greedy sample:")
        typer.echo(greedy_sample(result.checkpoint_dir, SAMPLE_PROMPT, SAMPLE_TOKENS))
