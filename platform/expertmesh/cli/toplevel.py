"""Top-level ``expertmesh up`` / ``down`` / ``status``.

``up`` starts the platform (local Ray, Valkey, gateway, job scheduler; see ``expertmesh platform
up``), or, given ``--model``/``--nodes``, the distributed data plane (see ``expertmesh dataplane
up``). ``down`` and ``status`` act on whichever of the two is up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from expertmesh.cli import CLIError, app, dataplane, platform
from expertmesh.cli.platform import StateDirOption


@app.command("up")
def up(
    model: Annotated[Path | None, typer.Option("--model", help="data plane: checkpoint to serve")] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", help="data plane: Ray nodes to spread experts over")] = None,
    slots_per_node: Annotated[int, typer.Option("--slots-per-node", help="data plane: expert slots per node")] = 1,
    dispatch: Annotated[str, typer.Option("--dispatch", help="data plane: fp8 | bf16 | fp32 on the wire")] = "fp8",
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap", help="data plane: two micro-batches")] = False,
    quantization: Annotated[str, typer.Option("--quantization", help="data plane: auto | fp8 | none")] = "auto",
    detach: Annotated[bool, typer.Option("--detach", help="platform: run in the background")] = False,
    state_dir: StateDirOption = None,
    port: Annotated[int, typer.Option("--port", help="platform: gateway port")] = 8000,
    host: Annotated[str, typer.Option("--host", help="platform: gateway bind address")] = "127.0.0.1",
    address: Annotated[str | None, typer.Option("--address", help="join this Ray cluster")] = None,
    dashboard: Annotated[str | None, typer.Option("--dashboard", help="platform, with --address: dashboard URL")] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="platform, local Ray: CPUs to offer")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="platform: demo tenant, key, model and endpoint")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="platform: print the state as JSON when ready")] = False,
) -> None:
    """Start the platform and print its gateway URL; with --model/--nodes, the distributed data plane."""
    if model is not None or nodes is not None:
        if model is None:
            raise CLIError("--nodes starts the distributed data plane: give the checkpoint with --model")
        dataplane.up(model, nodes or 3, slots_per_node, address, dispatch, overlap, quantization)
        return
    platform.up(detach, state_dir, port, host, address, dashboard, num_cpus, demo, as_json)


@app.command("down")
def down(state_dir: StateDirOption = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Stop what `expertmesh up` started (the platform and/or the data plane)."""
    stopped = False
    if dataplane._state_path().exists():
        dataplane.down()
        stopped = True
    from expertmesh.serve.platform import read_state

    if read_state(platform.state_dir_or_default(state_dir)) is not None:
        platform.down(state_dir, as_json)
        stopped = True
    if not stopped:
        raise CLIError("nothing is up (neither the platform nor a data plane)")


@app.command("status")
def status(state_dir: StateDirOption = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Data plane (nodes, slots, hosted experts, health, controller) and/or platform status."""
    from expertmesh.serve.platform import read_state

    shown = False
    if dataplane._state_path().exists():
        dataplane.status(as_json)
        shown = True
    if read_state(platform.state_dir_or_default(state_dir)) is not None:
        platform.status(state_dir, as_json)
        shown = True
    if not shown:
        raise CLIError("nothing is up: start the platform with `expertmesh up`, or the data plane with "
                       "`expertmesh up --model DIR --nodes N`")
