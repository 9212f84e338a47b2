"""Distributed data plane from the command line: ``expertmesh dataplane up|status|down``
(also reached as ``expertmesh up --model DIR --nodes N``, ``expertmesh status``, ``expertmesh down``)
and ``generate --nodes N``.

``up`` keeps running in the foreground (Ctrl-C or ``expertmesh down`` stops everything) and
writes the service addresses to ``$EXPERTMESH_HOME/dataplane.json``; ``status`` reads that
file and asks every service over gRPC, so it needs no Ray connection.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from expertmesh import paths
from expertmesh.cli import CLIError, app
from expertmesh.cli.platform import alive

STATE_FILE = "dataplane.json"
dataplane_app = typer.Typer(help="The distributed data plane (attention, router, expert shards over gRPC).",
                            no_args_is_help=True)
app.add_typer(dataplane_app, name="dataplane")


def is_up() -> bool:
    path = _state_path()
    return path.exists() and alive(json.loads(path.read_text()).get("pid"))


def _state_path() -> Path:
    return paths.home() / STATE_FILE


def _config(model: Path, nodes: int, slots_per_node: int, dispatch: str, overlap: bool, quantization: str,
            redis_url: str | None = None, placement: str = "eplb"):
    from expertmesh.services.dataplane import DataPlaneConfig

    if not (model / "config.json").is_file():
        raise CLIError(f"{model} is not a checkpoint directory: config.json not found")
    return DataPlaneConfig(str(model.resolve()), num_nodes=nodes, slots_per_node=slots_per_node,
                           dispatch_dtype=dispatch, overlap=overlap, quantization=quantization,  # type: ignore[arg-type]
                           redis_url=redis_url, placement=placement)  # type: ignore[arg-type]


def platform_store_url() -> str | None:
    """Where the controller keeps its state: ``REDIS_URL``, else the running platform's store (so
    the platform's dashboard shows this data plane), else None (an embedded Valkey of its own)."""
    from expertmesh.cli.platform import state_dir_or_default
    from expertmesh.serve.platform import read_state

    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    state_dir = os.environ.get("EXPERTMESH_STATE_DIR")
    state = read_state(state_dir_or_default(Path(state_dir) if state_dir else None))
    return state["redis_url"] if state is not None and alive(state.get("pid")) else None


def status_from_addresses(state: dict) -> dict:
    """Live view of the services recorded by ``up`` (health and hosted experts over gRPC)."""
    import grpc

    from expertmesh.protos import load
    from expertmesh.services.dataplane import describe_services
    from expertmesh.services.server import channel

    from expertmesh.services.topology import SlotTable

    controller, table = None, None
    if state.get("controller"):
        ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")
        try:
            st = ctl_grpc.ControllerStub(channel(state["controller"])).GetStatus(ctl_pb.ControllerStatusRequest(),
                                                                                 timeout=5)
            controller = {"address": state["controller"], "healthy": True, "plan_version": st.plan_version,
                          "balancedness_now": st.balancedness_now,
                          "balancedness_before_last_replacement": st.balancedness_before_last,
                          "replacements": st.replacements, "failures_recovered": st.failures_recovered,
                          "live_slots": st.live_slots, "dead_slots": list(st.dead_slots),
                          "full_redundancy": st.full_redundancy}
            table = SlotTable.from_proto(st.slots) if st.slots.epoch else None
        except grpc.RpcError:  # reported as unhealthy, not raised
            controller = {"address": state["controller"], "healthy": False}
    return {
        "model": state["model"], "plan_version": controller["plan_version"] if controller and controller.get(
            "healthy") else state["plan_version"], "pid": state["pid"], "controller": controller,
        "nodes": state["nodes"],
        **describe_services(state["shards"], state["attention"], state["slots_per_node"], table=table),
    }


@dataplane_app.command("up")
def up(
    model: Annotated[Path, typer.Option("--model", help="checkpoint directory")],
    nodes: Annotated[int, typer.Option("--nodes", help="Ray nodes to spread experts over")] = 3,
    slots_per_node: Annotated[int, typer.Option("--slots-per-node")] = 1,
    address: Annotated[str | None, typer.Option("--address", help="join this Ray cluster instead of a local one")] = None,
    dispatch: Annotated[str, typer.Option("--dispatch", help="fp8 | bf16 | fp32 activations on the wire")] = "fp8",
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap")] = False,
    quantization: Annotated[str, typer.Option("--quantization", help="auto | fp8 | none")] = "auto",
    placement: Annotated[str, typer.Option("--placement", help="eplb | mirrored (every group on two nodes: "
                                                               "survives a node loss)")] = "eplb",
) -> None:
    """Start the distributed data plane (local multi-node cluster unless --address) and serve until stopped."""
    from expertmesh.services.dataplane import DataPlane

    state_path = _state_path()
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if alive(old.get("pid")):
            raise CLIError(f"a data plane is already up (pid {old['pid']}); run `expertmesh down` first")
    plane = DataPlane.start(_config(model, nodes, slots_per_node, dispatch, overlap, quantization,
                                    platform_store_url(), placement), address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        state = {"pid": os.getpid(), "model": str(model), "plan_version": plane.plan.version,
                 "controller": plane.controller_address, "redis_url": getattr(plane, "redis_url", None),
                 "slots_per_node": slots_per_node, "shards": plane.shard_addresses,
                 "attention": plane.attention_addresses,
                 "nodes": [{"index": i, "node_id": n, "forwarder": plane.forwarders[i]}
                           for i, n in enumerate(plane.node_ids)]}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))
        typer.echo(f"data plane up: {nodes} nodes, {nodes * slots_per_node} expert slots, plan v{plane.plan.version}")
        typer.echo(f"attention (gRPC expertmesh.v1.Attention/Router): {', '.join(plane.attention_addresses)}")
        typer.echo("`expertmesh status --json` to inspect; Ctrl-C or `expertmesh down` to stop")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping data plane...")
        plane.stop()
        state_path.unlink(missing_ok=True)


@dataplane_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Nodes, expert slots, which experts each slot hosts, and live health."""
    state_path = _state_path()
    if not state_path.exists():
        raise CLIError("no data plane is up (start one with `expertmesh up --model DIR --nodes N`)")
    info = status_from_addresses(json.loads(state_path.read_text()))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"model {info['model']}  plan v{info['plan_version']}  (pid {info['pid']})")
    ctl = info.get("controller")
    if ctl and ctl.get("healthy") and not ctl["replacements"]:
        typer.echo(f"  controller {ctl['address']}: no re-placement yet, {ctl['failures_recovered']} failures recovered")
    elif ctl and ctl.get("healthy"):
        typer.echo(f"  controller {ctl['address']}: balancedness {ctl['balancedness_now']:.3f} (before last "
                   f"re-placement {ctl['balancedness_before_last_replacement']:.3f}), {ctl['replacements']} "
                   f"re-placements, {ctl['failures_recovered']} failures recovered")
    elif ctl:
        typer.echo(f"  controller {ctl['address']}: DOWN")
    if ctl and ctl.get("healthy"):
        typer.echo(f"  expert slots: {ctl['live_slots']} live, dead {ctl['dead_slots'] or 'none'}, "
                   f"{'full redundancy' if ctl['full_redundancy'] else 'REDUNDANCY NOT RESTORED YET'}")
    for slot in info["slots"]:
        experts = slot.get("experts", {})
        first = next(iter(experts.values()), [])
        typer.echo(f"  node {slot['node']} slot {slot['slot']} {'forwarder ' if slot.get('forwarder') else ''}"
                   f"{'healthy' if slot['healthy'] else 'DOWN'}  experts(first MoE layer) {first}")
    for a in info["attention"]:
        typer.echo(f"  attention rank {a['rank']} {a['address']} {'healthy' if a['healthy'] else 'DOWN'}")


@dataplane_app.command("down")
def down(timeout_s: Annotated[float, typer.Option("--timeout")] = 60.0) -> None:
    """Stop the data plane started by `expertmesh up`."""
    state_path = _state_path()
    if not state_path.exists():
        raise CLIError("no data plane is up")
    pid = json.loads(state_path.read_text()).get("pid")
    if not alive(pid):
        state_path.unlink(missing_ok=True)
        typer.echo("data plane was not running; state cleared")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if alive(pid):
        raise CLIError(f"data plane (pid {pid}) did not stop within {timeout_s:.0f}s")
    typer.echo("data plane stopped")


placement_app = typer.Typer(help="Expert placement (EPLB) of the running data plane.", no_args_is_help=True)
app.add_typer(placement_app, name="placement")


@placement_app.command("rebalance")
def placement_rebalance(
    force: Annotated[bool, typer.Option("--force", help="re-place even below the gain threshold")] = False,
    whole_plan: Annotated[bool, typer.Option("--whole-plan", help="double-buffer every layer at once instead of "
                                                                  "one MoE layer at a time")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-place experts now from the observed load, one MoE layer at a time (live: no request fails)."""
    from expertmesh.protos import load
    from expertmesh.services.server import channel

    state_path = _state_path()
    if not state_path.exists():
        raise CLIError("no data plane is up (start one with `expertmesh up --model DIR --nodes N`)")
    address = json.loads(state_path.read_text()).get("controller")
    if not address:
        raise CLIError("this data plane runs without a controller")
    ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")
    r = ctl_grpc.ControllerStub(channel(address)).Rebalance(ctl_pb.RebalanceRequest(force=force, whole_plan=whole_plan),
                                                             timeout=600)
    result = {"replaced": r.replaced, "reason": r.reason, "old_version": r.old_version, "new_version": r.new_version,
              "balancedness_before": r.balancedness_before, "balancedness_after": r.balancedness_after,
              "seconds": r.seconds, "moves": r.moves, "layer_steps": r.layer_steps,
              "layer_pause_ms_p50": r.layer_pause_ms_p50, "layer_pause_ms_max": r.layer_pause_ms_max,
              "layer_drain_ms_max": r.layer_drain_ms_max, "peak_extra_experts": r.peak_extra_experts,
              "total_experts_loaded": r.total_experts_loaded}
    typer.echo(json.dumps(result, indent=2) if as_json else
               (f"plan v{r.old_version} -> v{r.new_version} in {r.seconds:.2f}s ({r.moves} slot moves, "
                f"{r.layer_steps or 1} step(s), per-layer pause p50 {r.layer_pause_ms_p50:.2f} ms / max "
                f"{r.layer_pause_ms_max:.2f} ms): {r.reason}"
                if r.replaced else r.reason))
