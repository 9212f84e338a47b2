"""gRPC server bootstrap and request-path conventions shared by every ExpertMesh service.

``create_server(address, services)`` starts a server with health checking and reflection on,
explicit message-size limits, and returns ``(server, port)``. ``rpc`` wraps servicer methods:
a call without a deadline is INVALID_ARGUMENT; bad input (``ValueError``) is INVALID_ARGUMENT;
a stale placement plan is ABORTED (retriable); ``Unavailable`` (no live replica, an
unreachable slot) is UNAVAILABLE (retriable) with the unreachable slots in trailing metadata
``expertmesh-dead-slots``; anything else is INTERNAL with a short message
and the traceback in the server log. The server keeps serving either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # largest dispatch: 16k tokens x 4 KiB hidden in FP32
DEFAULT_RPC_TIMEOUT_S = 30.0
NO_DEADLINE_S = 7 * 24 * 3600.0  # a remaining time longer than a week means the caller set none
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


DEAD_SLOTS_KEY = "expertmesh-dead-slots"  # trailing metadata: comma-separated slot ids a forwarder could not reach


class StalePlan(Exception):
    """The request names a placement plan this service does not serve; retry with the current one."""


class Unavailable(Exception):
    """Retriable: something this request needs is down (a slot, every replica of an expert).
    ``dead_slots`` names the slots found unreachable, so the caller can route around them."""

    def __init__(self, message: str, dead_slots: tuple[int, ...] = ()):
        super().__init__(message)
        self.dead_slots = tuple(dead_slots)


def dead_slots_of(exc: grpc.RpcError) -> tuple[int, ...]:
    """The slots a failed call reported unreachable (empty when it reported none)."""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == DEAD_SLOTS_KEY and value:
                return tuple(int(s) for s in value.split(","))
    except (AttributeError, ValueError):
        pass
    return ()


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        remaining = context.time_remaining()
        if remaining is None or remaining > NO_DEADLINE_S:  # grpc reports "no deadline" as a huge remainder
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method.__name__}: calls must carry a deadline")
        try:
            return method(self, request, context)
        except StalePlan as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        except Unavailable as exc:
            if exc.dead_slots:
                context.set_trailing_metadata(((DEAD_SLOTS_KEY, ",".join(map(str, exc.dead_slots))),))
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError as exc:  # a downstream call failed: pass its status through
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNAVAILABLE
            context.abort(code, f"{method.__name__}: downstream: {exc.details() if hasattr(exc, 'details') else exc}")
        except Exception as exc:  # noqa: BLE001 - last resort: a status, never a dead server
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(exc).__name__}: {exc}")

    return wrapper


def create_server(
    address: str,
    services: list[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a server on ``address`` ("127.0.0.1:0" picks a port) for (add_fn, servicer, full_name)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    for add, servicer, full_name in services:
        add(servicer, server)
        health_servicer.set(full_name, health_pb2.HealthCheckResponse.SERVING)
        names.append(full_name)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {address}")
    server.start()
    return server, port


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def check_health(address: str, timeout_s: float = 2.0) -> bool:
    try:
        with channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
