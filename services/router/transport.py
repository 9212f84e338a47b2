"""The portable transport: per-node batches over gRPC to one live forwarding shard of each node.

Every shard of a node can forward for it; the transport sends to the first live one (the slot
table's order) and, when a send fails with a transport error, reports which slots were found
unreachable: the forwarder itself (connection refused, deadline) or the peers it named in the
``expertmesh-dead-slots`` trailing metadata. The router marks those dead and re-routes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from expertmesh.protos import load
from expertmesh.services.server import channel, dead_slots_of

pb_grpc = load("expert_shard_pb2_grpc")

DISPATCH_TIMEOUT_S = 10.0  # a dispatch that takes longer is treated as a dead node: never hang
# statuses that mean "the service is not there", as opposed to a bad or stale request
TRANSPORT_ERRORS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN)


class NodeUnavailable(RuntimeError):
    """A node send failed; ``dead_slots`` are the slots found unreachable (retry elsewhere)."""

    def __init__(self, message: str, dead_slots: tuple[int, ...] = ()):
        super().__init__(message)
        self.dead_slots = tuple(dead_slots)


@dataclass(frozen=True)
class SendHandle:
    node: int
    forwarder_slot: int
    future: object


class GrpcTransport:
    def __init__(self, forwarder_addresses: dict[int, str] | None = None, timeout_s: float = DISPATCH_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stubs: dict[str, object] = {}  # address -> stub (channels live as long as the transport)
        # node -> its forwarder, for sends that name none (a router without a slot table)
        self._fixed = {node: [(-1, address)] for node, address in (forwarder_addresses or {}).items()}

    def _stub(self, address: str):
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = pb_grpc.ExpertShardStub(channel(address))
            return self._stubs[address]

    def send(self, node: int, request, forwarders: list[tuple[int, str]] | None = None) -> SendHandle:
        """Send to the first of ``forwarders`` [(slot, address)] (the router passes those of the
        routing tables its dispatch reads, so both agree on which slots live), else to the node's
        fixed forwarder."""
        route = (self._fixed.get(node) if forwarders is None else forwarders) or []
        if not route:
            raise NodeUnavailable(f"no live forwarder known for node {node}")
        slot, address = route[0]
        return SendHandle(node, slot, self._stub(address).Dispatch.future(request, timeout=self.timeout_s))

    def result(self, handle: SendHandle):
        try:
            return handle.future.result()
        except grpc.RpcError as exc:
            if exc.code() not in TRANSPORT_ERRORS:
                raise  # bad input / stale plan: the caller's problem, not a dead node
            named = dead_slots_of(exc)
            dead = named if named else ((handle.forwarder_slot,) if handle.forwarder_slot >= 0 else ())
            raise NodeUnavailable(f"node {handle.node} (forwarder slot {handle.forwarder_slot}): "
                                  f"{exc.code().name}: {exc.details()}", dead) from exc
