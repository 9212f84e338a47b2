"""Fault-recovery policy: dead slots in, a decision out (pure; the controller executes it).

    decision = decide_recovery(table, plan, plan_slots, dead={3}, node_alive=lambda n: True)
    # RECREATE slot 3 on node 1 (its node lives)    -> decision.recreate == (3,)
    # a node whose every slot is dead, or that Ray reports dead, is lost: its slots' physical
    # experts are ADOPTED by survivors, fewest-hosted first -> decision.adopt == {0: (8, 10), 1: (9, 11)}

Glossary: see services/topology.py (slot id, position, adopted, epoch).
Example: 24 physical, 6 slots x 4, node 2 (slots 4, 5) removed: physical 16..23 lose their host;
the four survivors adopt two each, and every physical expert of the plan is hosted again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from expertmesh.placement import PlacementPlan
from expertmesh.services.topology import SlotTable, hosting


@dataclass(frozen=True)
class RecoveryDecision:
    dead: frozenset[int]  # slots found dead this round
    recreate: tuple[int, ...]  # slot ids to start again on their own (live) node
    adopt: dict[int, tuple[int, ...]]  # survivor slot -> physical ids it will host
    lost_nodes: tuple[int, ...]
    reason: str


def lost_nodes(table: SlotTable, dead: set[int], node_alive: Callable[[int], bool]) -> tuple[int, ...]:
    """Nodes whose every slot is dead (after this round), or that the cluster reports dead."""
    nodes = sorted({s.node for s in table.slots})
    out = []
    for node in nodes:
        slots = table.node_slots(node, alive_only=False)
        if all((not s.alive) or s.slot in dead for s in slots) or not node_alive(node):
            out.append(node)
    return tuple(out)


def decide_recovery(table: SlotTable, plan: PlacementPlan, plan_slots: tuple[int, ...], dead: set[int],
                    node_alive: Callable[[int], bool]) -> RecoveryDecision:
    info = table.by_id()
    unknown = sorted(set(dead) - set(info))
    if unknown:
        raise ValueError(f"dead slot(s) {unknown} are not in the slot table (slots {sorted(info)})")
    gone = lost_nodes(table, dead, node_alive)
    recreate = tuple(sorted(s for s in dead if info[s].node not in gone))
    down = {s.slot for s in table.slots if not s.alive} | set(dead)
    orphaned_slots = {s for s in down if info[s].node in gone}
    survivors = [s.slot for s in table.slots if s.slot not in down]
    hosts = hosting(plan, plan_slots, table)
    orphans = [p for p, s in enumerate(hosts.host_slot_P.tolist()) if s in orphaned_slots]
    adopt: dict[int, list[int]] = {}
    if orphans and not survivors:
        return RecoveryDecision(frozenset(dead), recreate, {}, gone, "no surviving slot can adopt the lost experts")
    hosted = {s: int((hosts.host_slot_P == s).sum()) for s in survivors}
    for p in orphans:  # spread the orphans: the survivor hosting fewest physical experts takes the next one
        target = min(survivors, key=lambda s: (hosted[s], s))
        adopt.setdefault(target, []).append(p)
        hosted[target] += 1
    reason = (f"RECOVER: dead slots {sorted(dead)}; recreate {list(recreate)} on their nodes; "
              f"lost nodes {list(gone)}: {len(orphans)} physical experts adopted by {sorted(adopt)}")
    return RecoveryDecision(frozenset(dead), recreate, {s: tuple(ps) for s, ps in adopt.items()}, gone, reason)
