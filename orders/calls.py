"""Per-call plumbing for the grpclib server: request ids, error mapping and the access log.

Installed as a grpclib ``RecvRequest`` listener that wraps every method handler, so it also
covers requests that fail to decode. Service code raises :mod:`orders.errors`; here they become
gRPC statuses. Anything unexpected becomes INTERNAL with the request id, and its traceback goes to
the log only, never onto the wire.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import betterproto2
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.protocol import Peer
from grpclib.server import Server, Stream

from orders.errors import OrderError

REQUEST_ID_HEADER = "x-request-id"

access_log = logging.getLogger("orders.access")
log = logging.getLogger(__name__)


class StrictProtoCodec(ProtoCodec):
    """grpclib's protobuf codec, answering undecodable messages with INVALID_ARGUMENT.

    betterproto2's parser is lenient: it stops silently at a truncated tag, reads a length past the
    end of the data, accepts field number 0, and decodes a field sent with the wrong wire type into a
    value of the wrong Python type (which would crash the handler). So each request is first parsed
    by the protobuf runtime (upb, in C) for the same descriptor, which rejects malformed data and
    files a mistyped known field under unknown fields, where we find it.
    """

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
                _reject_mistyped_fields(_protobuf_class(message_type).FromString(data))
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the request is not a valid {message_type.__name__} message: {exc}"
            ) from exc


@functools.cache
def _protobuf_class(message_type: type[betterproto2.Message]) -> Any:
    """The protobuf runtime's message class for a generated betterproto2 message (same descriptor)."""
    return message_factory.GetMessageClass(message_type.DESCRIPTOR)


def _reject_mistyped_fields(message: Message) -> None:
    """Raise ValueError if a declared field arrived with the wrong wire type (protobuf kept it as unknown)."""
    declared = message.DESCRIPTOR.fields_by_number
    for unknown in UnknownFieldSet(message):
        if unknown.field_number in declared:
            raise ValueError(f"field {declared[unknown.field_number].name} has the wrong wire type")
    for field, value in message.ListFields():
        if field.message_type is not None:
            for child in value if field.is_repeated else (value,):
                _reject_mistyped_fields(child)


@dataclass(frozen=True, slots=True)
class Call:
    """A call as admission guards see it, before its handler runs."""

    method: str
    metadata: Any  # grpclib's multidict of request metadata
    peer: Peer | None
    request_id: str
    stream: Stream[Any, Any]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A finished call as observers see it."""

    method: str
    code: str
    peer: tuple[str, int] | None
    request_id: str
    duration: float


Release = Callable[[], None]


class CallGuard(Protocol):
    """Decides whether a call may run (auth, limits); runs before the handler."""

    def admit(self, call: Call) -> Release | None:
        """Raise an :class:`OrderError` to refuse the call; return a callback to run when it ends, if any."""


CallObserver = Callable[[CallRecord], None]


def log_access(record: CallRecord) -> None:
    """The default observer: one access-log line per call."""
    access_log.info(
        "%s %s peer=%s request_id=%s %.1fms",
        record.method,
        record.code,
        record.peer,
        record.request_id,
        record.duration * 1000,
    )


class CallMiddleware:
    """Wraps every call of a grpclib server: request id, admission guards, error mapping, observers
    (access log, metrics), and drain tracking."""

    def __init__(self, guards: Sequence[CallGuard] = (), observers: Sequence[CallObserver] = (log_access,)) -> None:
        self.draining = False
        self._guards = list(guards)
        self._observers = list(observers)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def install(self, server: Server) -> None:
        """Attach to ``server``; call before it starts."""
        listen(server, RecvRequest, self._wrap_call)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls with UNAVAILABLE and wait up to ``timeout`` s for the running ones."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _wrap_call(self, event: RecvRequest) -> None:
        handler = event.method_func
        method = event.method_name
        metadata = event.metadata
        request_id = str(metadata.get(REQUEST_ID_HEADER) or uuid.uuid4().hex[:16])
        peer = event.peer

        async def handle(stream: Stream[Any, Any]) -> None:
            started = time.perf_counter()
            code = "OK"
            releases: list[Release] = []
            self._in_flight += 1
            self._idle.clear()
            try:
                if self.draining:
                    raise GRPCError(Status.UNAVAILABLE, "the server is shutting down; retry on another server or later")
                call = Call(method, metadata, peer, request_id, stream)
                for guard in self._guards:
                    release = guard.admit(call)
                    if release is not None:
                        releases.append(release)
                await handler(stream)
            except GRPCError as exc:
                code = exc.status.name
                raise
            except OrderError as exc:
                code = exc.code
                raise GRPCError(Status[exc.code], exc.message) from None
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("request %s (%s) failed", request_id, method)
                raise GRPCError(
                    Status.INTERNAL, f"internal server error; the server log has details under request id {request_id}"
                ) from None
            finally:
                for release in releases:
                    release()
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
                record = CallRecord(
                    method, code, peer.addr() if peer is not None else None, request_id, time.perf_counter() - started
                )
                for observe in self._observers:
                    observe(record)

        event.method_func = handle
