"""The scheduler as a detached Ray actor: Ray restarts it if it dies; each incarnation has a
new consumer name and reclaims what the previous one left pending."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path

SCHEDULER_ACTOR_NAME = "expertmesh-scheduler"
NAMESPACE = "expertmesh"


class SchedulerService:
    """Runs :class:`expertmesh.jobs.scheduler.Scheduler` in a thread inside the actor."""

    def __init__(self, redis_url: str, dashboard_address: str, runs_root: str, config: dict | None = None,
                 command: list[str] | None = None):
        from expertmesh.jobs.launcher import DEFAULT_COMMAND, LaunchConfig, RayJobsLauncher
        from expertmesh.jobs.scheduler import Scheduler, SchedulerConfig
        from expertmesh.store import connect

        launch = LaunchConfig(Path(runs_root), tuple(command or DEFAULT_COMMAND))
        self.scheduler = Scheduler(connect(redis_url), RayJobsLauncher(dashboard_address), launch,
                                   SchedulerConfig(**(config or {})))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.scheduler.run, args=(self._stop.is_set,), daemon=True,
                                        name="job-scheduler")
        self._thread.start()

    def info(self) -> dict:
        return {"consumer": self.scheduler.consumer, "alive": self._thread.is_alive(),
                "config": asdict(self.scheduler.config)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def start_scheduler_actor(redis_url: str, dashboard_address: str, runs_root: str, config: dict | None = None,
                          command: list[str] | None = None):
    """Get or create the detached scheduler actor (needs ``ray.init`` done)."""
    import ray

    actor_cls = ray.remote(SchedulerService).options(
        name=SCHEDULER_ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0)
    return actor_cls.remote(redis_url, dashboard_address, runs_root, config, command)


def stop_scheduler_actor() -> bool:
    import ray

    try:
        actor = ray.get_actor(SCHEDULER_ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=15)
    finally:
        ray.kill(actor, no_restart=True)
    return True
