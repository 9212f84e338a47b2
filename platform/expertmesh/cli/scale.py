"""``expertmesh scale --expert-slots N``: elastic expert parallelism on the running data plane.

The controller starts new expert-shard slots (on the nodes with fewest slots, including nodes
that joined or rejoined the Ray cluster since the start) or stops slots (from the nodes with
most), then re-places every expert over the new slot set live: routers switch plans without a
restart and no request fails. N must be enough to hold every logical expert once at the
current experts-per-slot.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from expertmesh.cli import CLIError, app

SCALE_TIMEOUT_S = 900.0  # starting shards (a worker each, loading experts) and a re-placement


def parse_slots(value: str) -> int:
    try:
        slots = int(value)
    except ValueError:
        raise CLIError(f"--expert-slots must be a positive integer, got {value!r}") from None
    if slots < 1:
        raise CLIError(f"--expert-slots must be a positive integer, got {slots}")
    return slots


def controller_address() -> str:
    from expertmesh.cli.dataplane import _state_path

    path = _state_path()
    if not path.exists():
        raise CLIError("no data plane is up (start one with `expertmesh up --model DIR --nodes N`)")
    address = json.loads(path.read_text()).get("controller")
    if not address:
        raise CLIError("this data plane runs without a controller, so it cannot scale")
    return address


@app.command("scale")
def scale(
    expert_slots: Annotated[str, typer.Option("--expert-slots", help="wanted number of expert-shard slots")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Add or remove expert-shard slots at runtime and re-place experts over them (no restart)."""
    import grpc

    from expertmesh.protos import load
    from expertmesh.services.server import channel

    slots = parse_slots(expert_slots)
    address = controller_address()
    ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")
    try:
        with channel(address) as ch:
            r = ctl_grpc.ControllerStub(ch).Scale(ctl_pb.ScaleRequest(expert_slots=slots), timeout=SCALE_TIMEOUT_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise CLIError(f"the controller at {address} does not answer: {exc.details()}") from None
        raise CLIError(exc.details() or exc.code().name) from None
    result = {"slots_before": r.slots_before, "slots_after": r.slots_after, "added": list(r.added),
              "removed": list(r.removed)}
    if r.HasField("replan"):
        result["plan"] = {"old_version": r.replan.old_version, "new_version": r.replan.new_version,
                          "balancedness_before": r.replan.balancedness_before,
                          "balancedness_after": r.replan.balancedness_after, "seconds": r.replan.seconds}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif not r.added and not r.removed:
        typer.echo(f"already {r.slots_after} expert slots; nothing to do")
    else:
        plan = result.get("plan", {})
        typer.echo(f"expert slots {r.slots_before} -> {r.slots_after} (added {list(r.added)}, removed "
                   f"{list(r.removed)}); plan v{plan.get('old_version')} -> v{plan.get('new_version')} "
                   f"in {plan.get('seconds', 0.0):.2f}s")
