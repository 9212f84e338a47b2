"""``expertmesh checkpoint list|validate``: which serving checkpoints exist and whether they can be served.

``list [DIR...]`` finds serving checkpoints under the given directories (default: the run
directory ``$EXPERTMESH_HOME/runs``; a training run lists its exported ``checkpoint/`` and the
``model/`` of each Ray Train step checkpoint) and shows validity, format, size and step.
``validate DIR`` prints the full report and exits 1, with one line on stderr, when the
checkpoint must not be served. See :mod:`expertmesh.model.checkpoint_check` for the checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from expertmesh import paths
from expertmesh.cli import CLIError, app
from expertmesh.model.checkpoint_check import (
    CheckMode,
    CheckpointReport,
    ManifestStatus,
    find_checkpoints,
    verify_checkpoint,
)

INVALID_EXIT_CODE = 1
checkpoint_app = typer.Typer(help="Serving checkpoints: list them, validate one before serving it.",
                             no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")

JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]

_MANIFEST_WORDS = {
    ManifestStatus.VERIFIED: "sha256 of every file verified against expertmesh-manifest.json",
    ManifestStatus.SIZES_MATCH: "file sizes match expertmesh-manifest.json (weight hashes not checked: use --deep)",
    ManifestStatus.ABSENT: "not checked: no expertmesh-manifest.json (saved by another tool); structure checked",
    ManifestStatus.MISMATCH: "FAILED against expertmesh-manifest.json",
}


def _mode(deep: bool) -> CheckMode:
    return CheckMode.DEEP if deep else CheckMode.QUICK


def format_bytes(n_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def format_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe(report: CheckpointReport) -> list[str]:
    """The report as aligned lines (``validate`` prints them)."""
    status = "valid" if report.ok else f"INVALID ({len(report.problems)} problem(s))"
    lines = [f"checkpoint:  {report.path}", f"status:      {status}, {report.mode.value} check"]
    if report.num_layers is not None:
        lines.append(f"model:       {report.format or '-'}, {report.num_layers} layers ({report.num_moe_layers} MoE), "
                     f"{report.num_routed_experts} routed experts, {format_count(report.parameter_count)} parameters")
    shards = ", ".join(report.shard_files) if len(report.shard_files) <= 3 else (
        f"{report.shard_files[0]} ... {report.shard_files[-1]}")
    lines.append(f"on disk:     {format_bytes(report.bytes_on_disk)}, {len(report.shard_files)} weight file(s)"
                 + (f" ({shards})" if shards else ""))
    lines.append(f"content:     {_MANIFEST_WORDS[report.manifest]}")
    if report.step is not None or report.source is not None:
        step = f", step {report.step}" if report.step is not None else ""
        lines.append(f"written by:  {report.source or '-'}{step}")
    for problem in report.problems:
        lines.append(f"problem:     {problem}")
    if report.fix:
        lines.append(f"fix:         {report.fix}")
    return lines


@checkpoint_app.command("validate")
def validate(
    directory: Annotated[Path, typer.Argument(help="checkpoint directory (config.json + safetensors)")],
    deep: Annotated[bool, typer.Option("--deep/--quick", help="deep: hash every byte and scan for NaN/Inf; "
                                                             "quick: structure, sizes and small files only")] = True,
    as_json: JsonOption = False,
) -> None:
    """Check a serving checkpoint; exit 1 with one line on stderr if it must not be served."""
    if not directory.is_dir():
        raise CLIError(f"{directory} is not a directory")
    report = verify_checkpoint(directory, _mode(deep))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        typer.echo("\n".join(describe(report)))
    if not report.ok:
        typer.echo(f"error: {report.error_message()}", err=True)
        raise typer.Exit(INVALID_EXIT_CODE)


@checkpoint_app.command("list")
def list_checkpoints(
    directories: Annotated[list[Path] | None, typer.Argument(
        help="directories to search (default: $EXPERTMESH_HOME/runs)", show_default=False)] = None,
    deep: Annotated[bool, typer.Option("--deep/--quick", help="hash every checkpoint fully (slow) or check "
                                                             "structure and sizes")] = False,
    as_json: JsonOption = False,
) -> None:
    """List the serving checkpoints under DIR... with validity, format, size and step."""
    roots = list(directories) if directories else [paths.home() / "runs"]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing and directories:
        raise CLIError(f"not a directory: {', '.join(missing)}")
    reports = [verify_checkpoint(path, _mode(deep)) for root in roots if root.is_dir()
               for path in find_checkpoints(root)]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    if not reports:
        typer.echo(f"no serving checkpoints under {', '.join(map(str, roots))}")
        return
    rows = [("STATUS", "FORMAT", "SIZE", "PARAMS", "STEP", "PATH")]
    for r in reports:
        rows.append(("ok" if r.ok else "INVALID", r.format or "-", format_bytes(r.bytes_on_disk),
                     format_count(r.parameter_count), "-" if r.step is None else str(r.step), str(r.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    problems = {str(r.path): r.problems[0] for r in reports if not r.ok}
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if row[-1] in problems:
            typer.echo(f"    ^ {problems[row[-1]]}")
    bad = sum(not r.ok for r in reports)
    typer.echo(f"{len(reports)} checkpoint(s), {bad} invalid ({_mode(deep).value} check)")
