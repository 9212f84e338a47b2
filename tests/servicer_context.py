"""A stand-in for ``grpc.ServicerContext`` where unit tests call a servicer method directly: what
``expertmesh.services.server.rpc`` asks of one, and what it recorded."""

from __future__ import annotations

import grpc


class Aborted(Exception):
    """``context.abort`` was called (gRPC raises too, so the method stops there)."""


class ServicerContext:
    code: grpc.StatusCode | None = None
    details = ""
    trailing: tuple = ()

    def time_remaining(self) -> float:
        return 10.0

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        raise Aborted(details)
