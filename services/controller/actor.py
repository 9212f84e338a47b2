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
                 bind_host: str = "127.0.0.1"):
        import redis

        from expertmesh.services.controller.client import GrpcPlaneClient
        from expertmesh.services.controller.controller import Controller
        from expertmesh.services.controller.policy import RebalancePolicy
        from expertmesh.services.controller.servicer import ControllerServicer
        from expertmesh.services.controller.store import ControllerStore

        store = ControllerStore(redis.Redis.from_url(redis_url))
        topology = store.topology() or topology  # a restarted controller trusts what it stored
        plane = GrpcPlaneClient(topology["shards"], topology["routers"], topology["moe_layers"],
                                topology["num_logical"])
        self.controller = Controller(store, plane, RebalancePolicy(topology["n_group"], min_gain),
                                     topology["moe_layers"], window_s)
        self.controller.bootstrap(PlacementPlan.from_dict(initial_plan))
        self.controller.reconcile()
        self.server, port = create_server(f"{bind_host}:0", [
            (pb_grpc.add_ControllerServicer_to_server, ControllerServicer(self.controller, redis_url),
             "expertmesh.v1.Controller")])
        self.address = f"{bind_host}:{port}"
        store.save_topology({**topology, "controller": self.address})
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, args=(poll_interval_s, rebalance_interval_s), daemon=True)
        self._loop.start()

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
