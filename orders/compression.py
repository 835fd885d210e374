"""Compressed request messages: gzip and deflate, gRPC's message compression as grpcio, grpc-go and
grpc-java clients send it when a channel or call is set to compress.

A message flagged compressed is compressed with the call's ``grpc-encoding``. It is inflated here with
at most the size limit as output, so a small message that would inflate to gigabytes (a "zip bomb")
is refused after the limit's worth of work. Replies are sent uncompressed, which every client reads.
"""

from __future__ import annotations

import zlib
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from orders.errors import InvalidArgument, ResourceExhausted

ENCODING_HEADER = "grpc-encoding"
# zlib's window bits for each encoding: gzip's wrapper, and zlib's (gRPC's "deflate", as its libraries send it)
_WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
SUPPORTED = ", ".join(["identity", *_WINDOW_BITS])


def request_encoding(h2_stream: Any) -> str:
    """The call's ``grpc-encoding`` request header (grpclib leaves it out of the metadata); "" if absent."""
    for name, value in h2_stream.headers or ():
        if name == ENCODING_HEADER:
            return str(value)
    return ""


def decompressed(data: bytes, encoding: str, max_bytes: int) -> bytes:
    """``data``, a message flagged compressed, inflated by ``encoding``.

    UNIMPLEMENTED for an encoding this server does not inflate, INVALID_ARGUMENT for none or for data
    that is not what it says, RESOURCE_EXHAUSTED if it inflates to more than ``max_bytes``.
    """
    if encoding in ("", "identity"):
        raise InvalidArgument(
            f"the request message is flagged compressed but the call's grpc-encoding is {encoding or 'missing'}; "
            f"name the compression in grpc-encoding ({SUPPORTED})"
        )
    window_bits = _WINDOW_BITS.get(encoding)
    if window_bits is None:
        raise GRPCError(
            Status.UNIMPLEMENTED,
            f"request messages compressed with {encoding!r} are not supported; use one of: {SUPPORTED}",
        )
    inflater = zlib.decompressobj(window_bits)
    try:
        message = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"the request message is not valid {encoding} data: {exc}") from None
    if len(message) > max_bytes:
        raise ResourceExhausted(
            f"request message inflates to more than {max_bytes:,} bytes, the limit (--max-message-bytes)"
        )
    if not inflater.eof or inflater.unused_data:
        raise InvalidArgument(f"the request message is not valid {encoding} data: cut short, or bytes after its end")
    return message
