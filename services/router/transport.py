"""The portable transport: per-node batches over gRPC to each node's forwarding shard."""

from __future__ import annotations

import grpc

from expertmesh.protos import load
from expertmesh.services.server import DEFAULT_RPC_TIMEOUT_S, channel

pb_grpc = load("expert_shard_pb2_grpc")


class NodeUnavailable(RuntimeError):
    """A node did not answer a dispatch in time or is gone; the request may be retried."""


class GrpcTransport:
    def __init__(self, forwarder_addresses: dict[int, str], timeout_s: float = DEFAULT_RPC_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._stubs = {node: pb_grpc.ExpertShardStub(channel(addr)) for node, addr in forwarder_addresses.items()}

    def send(self, node: int, request):
        if node not in self._stubs:
            raise NodeUnavailable(f"no forwarder known for node {node}")
        return self._stubs[node].Dispatch.future(request, timeout=self.timeout_s)

    def result(self, handle):
        try:
            return handle.result()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED):
                raise
            raise NodeUnavailable(f"dispatch failed: {exc.code().name}: {exc.details()}") from exc
