"""The controller as a detached, named Ray actor: Ray restarts it when it dies, and it resumes
from Redis (plan version, load window, counters) and reconciles the data plane."""

from __future__ import annotations

import logging
import threading

import ray

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services.server import create_server

log = logging.getLogger(__name__)
pb_grpc = load("controller_pb2_grpc")
CONTROLLER_NAME = "expertmesh-controller"


@ray.remote(num_cpus=0.01, max_restarts=-1, max_task_retries=3)
class ControllerActor:
    def __init__(self, redis_url: str, topology: dict, initial_plan: dict, window_s: float = 600.0,
                 min_gain: float = 0.02, rebalance_interval_s: float | None = 600.0, poll_interval_s: float = 5.0,
                 bind_host: str = "127.0.0.1", health_interval_s: float | None = 0.5):
        """``health_interval_s``: how often every shard is health-checked (None: no fault recovery)."""
        import redis

        from expertmesh.services.controller.client import GrpcPlaneClient
        from expertmesh.services.controller.controller import Controller
        from expertmesh.services.controller.policy import RebalancePolicy
        from expertmesh.services.controller.servicer import ControllerServicer
        from expertmesh.services.controller.shards import RayShardFactory
        from expertmesh.services.controller.store import ControllerStore
        from expertmesh.services.topology import SlotTable

        # this plane's own namespace: a restart (same plane id) resumes, a new plane starts fresh
        store = ControllerStore.for_plane(redis.Redis.from_url(redis_url), topology["plane_id"])
        topology = store.topology() or topology  # a restarted controller trusts what it stored
        table = SlotTable.from_dict(topology["slots"]) if topology.get("slots") else None
        plane = GrpcPlaneClient(topology["shards"], topology["routers"], topology["moe_layers"],
                                topology["num_logical"], table)
        shards = RayShardFactory(topology["plane_id"], topology["checkpoint"], topology.get("quantization", "auto"),
                                 topology["nodes"]) if topology.get("plane_id") else None
        self.controller = Controller(store, plane, RebalancePolicy(topology["n_group"], min_gain,
                                                                     topology.get("placement") == "mirrored"),
                                     topology["moe_layers"], window_s, shards=shards)
        store.save_topology(topology)
        self.controller.bootstrap(PlacementPlan.from_dict(initial_plan), table)
        self.controller.reconcile()
        self.server, port = create_server(f"{bind_host}:0", [
            (pb_grpc.add_ControllerServicer_to_server, ControllerServicer(self.controller, redis_url),
             "expertmesh.v1.Controller")])
        self.address = f"{bind_host}:{port}"
        store.save_topology({**(store.topology() or topology), "controller": self.address})
        store.make_current()
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, args=(poll_interval_s, rebalance_interval_s), daemon=True)
        self._loop.start()
        if health_interval_s is not None and shards is not None:
            self._health = threading.Thread(target=self._watch, args=(health_interval_s,), daemon=True)
            self._health.start()

    def _watch(self, health_interval_s: float) -> None:
        """Health-check every shard; recover the ones that stop answering."""
        while not self._stop.wait(health_interval_s):
            try:
                record = self.controller.check_health()
                if record is not None:
                    log.warning("RECOVERED: dead %s, recreated %s, adopted %s, route around %.2fs, restored %.2fs",
                                record.dead, record.recreated, record.adopted, record.route_around_s,
                                record.restore_s)
            except Exception:  # noqa: BLE001 - the watcher must outlive a failed round; it is logged
                log.exception("health round failed")

    def _run(self, poll_interval_s: float, rebalance_interval_s: float | None) -> None:
        """Collect load every poll; re-place on the timer (None = on demand only)."""
        since = 0.0
        while not self._stop.wait(poll_interval_s):
            try:
                self.controller.collect()
                since += poll_interval_s
                if rebalance_interval_s is not None and since >= rebalance_interval_s:
                    since = 0.0
                    self.controller.rebalance()
            except Exception:  # noqa: BLE001 - the loop must outlive a failed round; it is logged
                log.exception("controller round failed")

    def get_address(self) -> str:
        return self.address

    def plan_version(self) -> int:
        return self.controller.plan.version

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(grace=1.0)
