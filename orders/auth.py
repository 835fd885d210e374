"""Transport security: the bearer-token guard and the TLS contexts of server and client.

Token auth (``orders serve --token T`` or ``ORDERS_TOKEN=T``) admits a call only if its metadata has
``authorization: Bearer T``; every RPC needs it except the ``grpc.health.v1.Health`` service, so load
balancers and orchestrators can probe a server without holding the secret. Server reflection is *not*
exempt: the service's schema is only for authenticated callers (``grpcurl -H 'authorization: Bearer T'``
works). Tokens are compared in constant time and never logged or echoed in an error.

A token travels as plain HTTP/2 header data: serve TLS (``--tls-cert``/``--tls-key``) whenever the token
crosses a network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orders.errors import Unauthenticated

if TYPE_CHECKING:  # the client imports this module too, and needs none of the server machinery
    from orders.calls import Call

AUTHORIZATION = "authorization"
SCHEME = "bearer"
#: Services any caller may use without a token.
PUBLIC_SERVICES = ("grpc.health.v1.Health",)

MISSING_TOKEN = "missing bearer token: send metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
NOT_BEARER = "the authorization metadata is not a bearer token: send 'authorization: Bearer <token>'"

# What fits in an HTTP/2 header value as grpclib sends it, with no whitespace to trip over.
_TOKEN_PATTERN = re.compile(r"[!-~]+")

# Ciphers fit for HTTP/2 over TLS 1.2 (RFC 7540 §9.2.2: ephemeral key exchange, AEAD); TLS 1.3 suites are
# configured separately by OpenSSL and all allowed.
_H2_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class SecurityConfigError(ValueError):
    """A token, certificate, key or CA file that cannot be used; the message says which and why."""


def check_token(token: str) -> str:
    """Return ``token`` if it can be sent as a header value (visible ASCII, no spaces); raise otherwise.

    The message never contains the token itself.
    """
    if not _TOKEN_PATTERN.fullmatch(token):
        raise SecurityConfigError(
            "the bearer token must be non-empty printable ASCII without spaces (it is sent as an HTTP/2 header)"
        )
    return token


def _digest(value: bytes) -> bytes:
    # Comparing fixed-size digests keeps even the token's length out of the timing.
    return hashlib.sha256(value).digest()


class TokenGuard:
    """A :class:`orders.calls.CallGuard` that refuses calls without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, *, public_services: tuple[str, ...] = PUBLIC_SERVICES) -> None:
        self._expected = _digest(check_token(token).encode("ascii"))
        self._public = tuple(f"/{service}/" for service in public_services)

    def __repr__(self) -> str:  # never show the token, e.g. in a debugger or a log of the guard list
        return "TokenGuard(<redacted>)"

    def admit(self, call: Call) -> None:
        """Return if the call is public or carries the token; raise :class:`Unauthenticated` otherwise."""
        if call.method.startswith(self._public):
            return
        header = call.metadata.get(AUTHORIZATION)
        if not isinstance(header, str) or not header.strip():
            raise Unauthenticated(MISSING_TOKEN)
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != SCHEME:  # another scheme (Basic ...), or none: the value itself is not echoed
            raise Unauthenticated(NOT_BEARER)
        if not presented.strip():
            raise Unauthenticated(MISSING_TOKEN)
        if not hmac.compare_digest(_digest(presented.strip().encode("utf-8", "surrogateescape")), self._expected):
            raise Unauthenticated(INVALID_TOKEN)


#: Libraries that log every HTTP/2 header, values included (so ``authorization``), at DEBUG level.
HEADER_LOGGERS = ("hpack",)


def keep_headers_out_of_logs() -> None:
    """Raise the header-dumping loggers to INFO, so ``--log-level debug`` cannot write a token to the log.

    A level set explicitly at INFO or above is left as it is.
    """
    for name in HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


def bearer_metadata(token: str) -> dict[str, str]:
    """The call metadata that carries ``token``."""
    return {AUTHORIZATION: f"Bearer {check_token(token)}"}


def _readable(path: str | os.PathLike[str], what: str) -> str:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {os.fspath(path)!r}: {exc.strerror or exc}") from None
    return os.fspath(path)


def _no_passphrase() -> str:
    raise SecurityConfigError("the TLS private key is encrypted; give an unencrypted PEM key")


def server_ssl_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """The server side of TLS: HTTP/2 by ALPN, TLS 1.2 at least, the given PEM chain and key.

    Raises :class:`SecurityConfigError` naming the file if either cannot be read or they do not match.
    """
    cert = _readable(cert_file, "TLS certificate (--tls-cert)")
    key = _readable(key_file, "TLS private key (--tls-key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_ciphers(_H2_CIPHERS)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"cannot use --tls-cert {cert!r} with --tls-key {key!r}: they must be a PEM certificate chain and"
            f" its matching unencrypted PEM private key ({exc.reason or exc})"
        ) from None
    _check_current(cert)
    return context


def _check_current(cert: str) -> None:
    """SecurityConfigError if the certificate (the chain's first) has expired or is not valid yet: every
    client that verifies it would refuse the server, so it serves nobody."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]  # CPython's decoder
    if decode is None:
        return
    fields = decode(cert)
    not_before, not_after = (ssl.cert_time_to_seconds(fields[name]) for name in ("notBefore", "notAfter"))
    now = time.time()
    if now > not_after:
        problem = f"expired on {_utc(not_after)}"
    elif now < not_before:
        problem = f"is not valid until {_utc(not_before)}"
    else:
        return
    raise SecurityConfigError(
        f"the TLS certificate (--tls-cert) {cert!r} {problem}: clients that verify it refuse every connection;"
        " give a current one"
    )


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def client_ssl_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The client side of TLS: verify the server against ``ca_file`` (PEM), or the system trust store if None."""
    cafile = None if ca_file is None else _readable(ca_file, "CA file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as exc:
        raise SecurityConfigError(f"cannot use the CA file {cafile!r}: it must hold PEM certificates ({exc})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_H2_CIPHERS)
    context.set_alpn_protocols(["h2"])
    return context


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (so a plaintext token never leaves it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_token(token: str) -> Callable[[Any], Any]:
    """A grpclib ``SendRequest`` listener that puts ``token`` into every outgoing call's metadata."""
    header = bearer_metadata(token)[AUTHORIZATION]

    async def on_send_request(event: Any) -> None:
        event.metadata[AUTHORIZATION] = header

    return on_send_request
