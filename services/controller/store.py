"""The controller's durable state in Redis (embedded Valkey by default, any Redis via REDIS_URL).

Each data plane has a namespace of its own, ``em:ctl:<plane id>`` (``for_plane``): a controller
that Ray restarts gets the same plane id and resumes from it, while a new data plane on the same
store (``expertmesh up`` after ``expertmesh down`` on a running platform, or two planes sharing
one Redis) starts fresh instead of trusting another plane's plan, slots and addresses.
``em:ctl:current`` names the plane that started last (the dashboard shows that one); a plane
that stops removes its keys and that pointer when it is still its own.

Keys (per namespace):
  plans       hash  version -> plan JSON (PlacementPlan.to_dict)
  current     str   current plan version
  load        stream of load reports; entry ids are millisecond timestamps, which makes the
              sliding window an XRANGE from now - window (older entries are trimmed)
  stats       hash  replacements, failures_recovered, balancedness_now, balancedness_before_last
  events      list  JSON events (re-placements, recoveries), newest last, capped
  plan_slots  hash  version -> JSON list: slot id at each plan position (absent = identity)
  topology    str   JSON: service addresses, nodes, the live slot table (``slots``), checkpoint
A restarted controller reads all of it back and carries on.
"""

from __future__ import annotations

import json
import time

import redis
import torch

from expertmesh.placement import PlacementPlan

MAX_EVENTS = 1000
PREFIX = "em:ctl"
CURRENT_PLANE = f"{PREFIX}:current"  # str: id of the data plane that started last on this store
KEYS = ("plans", "current", "load", "stats", "events", "plan_slots", "topology")


def _text(value: bytes | str) -> str:
    """A Redis reply as text, whichever way the client decodes."""
    return value.decode() if isinstance(value, bytes) else value


def _stats(raw: dict) -> dict[str, float]:
    """The ``stats`` hash as read back: name -> number."""
    return {_text(k): float(v) for k, v in raw.items()}


class ControllerStore:
    def __init__(self, client: redis.Redis, namespace: str = PREFIX, plane_id: str | None = None):
        self.r = client
        self.ns = namespace
        self.plane_id = plane_id  # set by ``for_plane``: the data plane this namespace belongs to

    @classmethod
    def for_plane(cls, client: redis.Redis, plane_id: str) -> ControllerStore:
        """The namespace of one data plane (``em:ctl:<plane id>``)."""
        if not plane_id or ":" in plane_id or plane_id == "current":
            raise ValueError(f"a plane id must be non-empty, without ':' and not 'current', got {plane_id!r}")
        return cls(client, f"{PREFIX}:{plane_id}", plane_id)

    @classmethod
    def current(cls, client: redis.Redis) -> ControllerStore | None:
        """The namespace of the data plane that started last (None: no plane has)."""
        plane_id = client.get(CURRENT_PLANE)
        if plane_id is None:
            return None
        return cls.for_plane(client, _text(plane_id))

    def make_current(self) -> None:
        """Name this plane the store's current one (what the dashboard shows)."""
        if self.plane_id is None:
            raise ValueError(f"namespace {self.ns!r} is not a data plane's (ControllerStore.for_plane)")
        self.r.set(CURRENT_PLANE, self.plane_id)

    def drop(self) -> None:
        """Delete this namespace, and the current-plane pointer when it names this plane, in one
        transaction (a plane that stops leaves nothing behind)."""
        def remove(pipe: redis.client.Pipeline) -> None:
            current = pipe.get(CURRENT_PLANE)
            pipe.multi()
            pipe.delete(*(self._k(name) for name in KEYS))
            if current is not None and _text(current) == self.plane_id:
                pipe.delete(CURRENT_PLANE)

        self.r.transaction(remove, CURRENT_PLANE)

    def _k(self, name: str) -> str:
        return f"{self.ns}:{name}"

    # ---- plans -------------------------------------------------------------------------------------
    def save_plan(self, plan: PlacementPlan, make_current: bool = True,
                  plan_slots: tuple[int, ...] | list[int] | None = None,
                  replaced: tuple[float, float] | None = None) -> None:
        """Store a plan (with the slot id at each of its positions) and (atomically, in one
        transaction) make it the current one. ``replaced`` = (balancedness before, after) when the
        plan ends a re-placement: the count and both scores change in the same transaction, so no
        reader sees the new plan with the previous re-placement's figures."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("plans"), str(plan.version), json.dumps(plan.to_dict()))
        if plan_slots is not None:
            pipe.hset(self._k("plan_slots"), str(plan.version), json.dumps(list(plan_slots)))
        if make_current:
            pipe.set(self._k("current"), plan.version)
        if replaced is not None:
            pipe.hincrby(self._k("stats"), "replacements", 1)
            pipe.hset(self._k("stats"), mapping={"balancedness_before_last": replaced[0],
                                                 "balancedness_now": replaced[1]})
        pipe.execute()

    def current_plan(self) -> PlacementPlan | None:
        version = self.r.get(self._k("current"))
        return None if version is None else self.plan(int(version))

    def plan(self, version: int) -> PlacementPlan:
        raw = self.r.hget(self._k("plans"), str(version))
        if raw is None:
            raise KeyError(f"plan version {version} is not stored")
        return PlacementPlan.from_dict(json.loads(raw))

    def plan_slots(self, version: int) -> tuple[int, ...] | None:
        """Slot id at each position of plan ``version`` (None: identity)."""
        raw = self.r.hget(self._k("plan_slots"), str(version))
        return None if raw is None else tuple(json.loads(raw))

    # ---- load window -------------------------------------------------------------------------------
    def append_load(self, load_LE: torch.Tensor, window_s: float, now_s: float | None = None) -> None:
        """Record one load report [L, E] (token counts) and trim reports older than the window."""
        now_ms = int((now_s if now_s is not None else time.time()) * 1000)
        self.r.xadd(self._k("load"), {"load": json.dumps(load_LE.tolist())}, id=f"{now_ms}-*")
        self.r.xtrim(self._k("load"), minid=str(now_ms - int(window_s * 1000)))

    def load_window(self, window_s: float, now_s: float | None = None) -> torch.Tensor | None:
        """Token counts summed over the reports of the last ``window_s`` seconds [L, E]."""
        now_ms = int((now_s if now_s is not None else time.time()) * 1000)
        entries = self.r.xrange(self._k("load"), min=str(now_ms - int(window_s * 1000)), max="+")
        total = None
        for _, fields in entries:
            load = torch.tensor(json.loads(fields[b"load"] if b"load" in fields else fields["load"]))
            total = load if total is None else total + load
        return total

    # ---- stats, events, topology -------------------------------------------------------------------
    def record_replacement(self, old: int, new: int, before: float, after: float, seconds: float) -> None:
        """The ``replacement`` event of a finished re-placement (counted when its plan was saved)."""
        self.record_event("replacement", old=old, new=new, before=before, after=after, seconds=seconds)

    def record_recovery(self, event: dict) -> None:
        """One recovered failure: ``failures_recovered`` + 1 and a ``recovery`` event
        ({"kind": "recovery", "at", "slot"|"node", "route_around_s", "restore_s", ...})."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(self._k("stats"), "failures_recovered", 1)
        pipe.rpush(self._k("events"), json.dumps({"kind": "recovery", "at": time.time(), **event}))
        pipe.ltrim(self._k("events"), -MAX_EVENTS, -1)
        pipe.execute()

    def record_event(self, kind: str, **fields) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self._k("events"), json.dumps({"kind": kind, "at": time.time(), **fields}))
        pipe.ltrim(self._k("events"), -MAX_EVENTS, -1)
        pipe.execute()

    def set_stat(self, name: str, value: float) -> None:
        self.r.hset(self._k("stats"), name, value)

    def stats(self) -> dict[str, float]:
        return _stats(self.r.hgetall(self._k("stats")))

    def current_with_stats(self) -> tuple[PlacementPlan | None, dict[str, float]]:
        """The current plan and the stats read in one transaction: a re-placement's count and
        scores are never seen without its plan, nor its plan without them."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self._k("current"))
        pipe.hgetall(self._k("stats"))
        version, stats = pipe.execute()
        return None if version is None else self.plan(int(version)), _stats(stats)

    def events(self, last: int = 50) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self._k("events"), -last, -1)]

    def save_topology(self, topology: dict) -> None:
        self.r.set(self._k("topology"), json.dumps(topology))

    def topology(self) -> dict | None:
        raw = self.r.get(self._k("topology"))
        return None if raw is None else json.loads(raw)

    # ---- read-only views (the dashboard) -----------------------------------------------------------
    def load_reports(self, window_s: float, now_s: float | None = None) -> list[tuple[float, torch.Tensor]]:
        """Each load report of the last ``window_s`` seconds as (wall-clock seconds, [L, E] token
        counts), oldest first; the dashboard draws balancedness over time from them."""
        now_ms = int((now_s if now_s is not None else time.time()) * 1000)
        out = []
        for entry_id, fields in self.r.xrange(self._k("load"), min=str(now_ms - int(window_s * 1000)), max="+"):
            entry = _text(entry_id)
            raw = fields[b"load"] if b"load" in fields else fields["load"]
            out.append((int(entry.split("-")[0]) / 1000.0, torch.tensor(json.loads(raw))))
        return out
