"""Security (guarantee 6): bearer-token auth, TLS, and no SQL built from strings.

Certificates come from a throwaway CA made at test time (``trustme``). In-process servers cover the
behaviour in detail; real ``python -m orders.server`` processes cover the flags, the environment twins,
the log (the token must never reach it), the CLI and the official grpcio client.
"""

from __future__ import annotations

import ast
import asyncio
import hmac
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest
from multidict import MultiDict
from server_process import ServerProcess
from test_cli import ORDERS, assert_fails, stop, wait_for_start
from test_client import FreezingProxy
from test_interop import pb  # noqa: F401  (the grpcio stubs fixture, generated once per session)

import orders
from orders import auth
from orders._proto.orders.v1 import GetOrderRequest, OrderServiceStub, OrderStatus
from orders.auth import INVALID_TOKEN, MISSING_TOKEN, NOT_BEARER, SecurityConfigError, TokenGuard
from orders.calls import Call
from orders.client import Item, OrderClient
from orders.errors import Unauthenticated, Unavailable
from orders.server import OrderServer, ServerConfig
from orders.testing import running_server, temporary_database

# Fixed, not random: pytest-xdist workers must collect the same test parameters, and some name these.
TOKEN = "s3cr3t-840901df05a84e53b9fe789af9196450"
WRONG = "wr0ng-531f6158a83d40e9a4bea31cc6559d8e"
TIMEOUT = 10.0  # every call and wait has a deadline, so a broken server fails a test instead of hanging it
PROMPTLY = 5.0  # a refused connection must be reported well before the call's deadline
SERVICE = "orders.v1.OrderService"


# --- certificates ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A throwaway CA, a server certificate it signed for 127.0.0.1/localhost, and a CA nobody trusts."""
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    stranger = trustme.CA()
    other_key = stranger.issue_cert("127.0.0.1").private_key_pem.bytes()
    paths = SimpleNamespace(
        ca=tmp / "ca.pem",
        chain=tmp / "server-chain.pem",
        key=tmp / "server-key.pem",
        other_ca=tmp / "other-ca.pem",
        other_key=tmp / "other-key.pem",
        encrypted_key=tmp / "encrypted-key.pem",
        garbage=tmp / "garbage.pem",
        expired=tmp / "expired.pem",
        not_yet_valid=tmp / "not-yet-valid.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    server.private_key_and_cert_chain_pem.write_to_path(str(paths.chain))
    server.private_key_pem.write_to_path(str(paths.key))
    stranger.cert_pem.write_to_path(str(paths.other_ca))
    paths.other_key.write_bytes(other_key)
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), password=None)
    paths.encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    paths.garbage.write_text("not a certificate\n")
    now = datetime.now(UTC)
    expired = ca.issue_cert("127.0.0.1", not_before=now - timedelta(days=60), not_after=now - timedelta(days=1))
    expired.private_key_and_cert_chain_pem.write_to_path(str(paths.expired))  # the key, then the chain
    not_yet_valid = ca.issue_cert("127.0.0.1", not_before=now + timedelta(days=1), not_after=now + timedelta(days=60))
    not_yet_valid.private_key_and_cert_chain_pem.write_to_path(str(paths.not_yet_valid))
    return paths


def tls_options(certs: SimpleNamespace) -> dict[str, str]:
    return {"tls_cert": str(certs.chain), "tls_key": str(certs.key)}


@pytest.fixture
async def token_server() -> AsyncIterator[OrderServer]:
    """A plaintext server that requires TOKEN."""
    async with running_server(token=TOKEN) as server:
        yield server


@pytest.fixture
async def tls_server(certs: SimpleNamespace) -> AsyncIterator[OrderServer]:
    """A TLS server without token auth."""
    async with running_server(**tls_options(certs)) as server:
        yield server


def target_of(server: OrderServer) -> str:
    return f"127.0.0.1:{server.port}"


def client(server: OrderServer, **options: Any) -> OrderClient:
    return OrderClient(target_of(server), timeout=TIMEOUT, **options)


async def watch_first(client: OrderClient, **options: Any) -> Any:
    """The first update of a watch replaying the log from the start."""

    async def first() -> Any:
        async for update in client.watch(after_sequence=0, **options):
            return update
        raise AssertionError("the watch ended without an update")

    return await asyncio.wait_for(first(), TIMEOUT)


async def order_count(server: OrderServer) -> int:
    async with client(server, token=TOKEN) as authed:
        return len([o async for o in authed.list()])


# --- bearer token ---------------------------------------------------------------------------------------------

UNARY_CALLS: dict[str, Callable[[OrderClient, str], Awaitable[Any]]] = {
    "CreateOrder": lambda c, order_id: c.create([Item("Pen", 2, 1.25)]),
    "GetOrder": lambda c, order_id: c.get(order_id),
    "ListOrders": lambda c, order_id: c.list_page(),
    "UpdateOrderStatus": lambda c, order_id: c.update_status(order_id, OrderStatus.CONFIRMED),
    "CancelOrder": lambda c, order_id: c.cancel(order_id),
}


@pytest.mark.parametrize("rpc", UNARY_CALLS)
async def test_unary_rpcs_need_the_token(token_server: OrderServer, rpc: str) -> None:
    async with client(token_server, token=TOKEN) as authed:
        order = await authed.create([Item("Lamp", 1, 20.0)])
    call = UNARY_CALLS[rpc]
    for token, message in ((None, MISSING_TOKEN), (WRONG, INVALID_TOKEN)):
        async with client(token_server, token=token) as refused:
            with pytest.raises(Unauthenticated) as caught:
                await call(refused, order.id)
        assert caught.value.code == "UNAUTHENTICATED"
        assert caught.value.message == message
    async with client(token_server, token=TOKEN) as authed:
        assert await order_count(token_server) == 1  # the refused calls changed nothing
        await call(authed, order.id)
        after = await authed.get(order.id)
    changed = rpc in ("UpdateOrderStatus", "CancelOrder")
    assert after.version == (2 if changed else 1)
    assert await order_count(token_server) == (2 if rpc == "CreateOrder" else 1)


async def test_the_stream_needs_the_token(token_server: OrderServer) -> None:
    async with client(token_server, token=TOKEN) as authed:
        order = await authed.create([Item("Kite", 1, 15.0)])
        for token, message in ((None, MISSING_TOKEN), (WRONG, INVALID_TOKEN)):
            async with client(token_server, token=token) as refused:
                with pytest.raises(Unauthenticated) as caught:
                    await watch_first(refused)
            assert caught.value.message == message
        update = await watch_first(authed)
        assert (update.order_id, update.sequence, update.status) == (order.id, 1, OrderStatus.PENDING)


@pytest.mark.parametrize(
    ("header", "outcome"),
    [
        (None, MISSING_TOKEN),
        (f"Bearer {TOKEN}", "OK"),
        (f"bearer {TOKEN}", "OK"),  # the auth scheme is case-insensitive (RFC 7235)
        (f"BEARER {TOKEN}", "OK"),
        (TOKEN, NOT_BEARER),  # no scheme
        (f"Basic {TOKEN}", NOT_BEARER),
        ("Bearer", MISSING_TOKEN),
        (f"Bearer {TOKEN}x", INVALID_TOKEN),
        (f"Bearer {TOKEN[:-1]}", INVALID_TOKEN),
        (f"Bearer {TOKEN.upper()}", INVALID_TOKEN),
        (f"Bearer {WRONG}", INVALID_TOKEN),
    ],
)
async def test_authorization_header_forms(token_server: OrderServer, header: str | None, outcome: str) -> None:
    metadata = {} if header is None else {"authorization": header}
    async with Channel("127.0.0.1", token_server.port) as channel:
        with pytest.raises(GRPCError) as caught:
            await OrderServiceStub(channel).get_order(
                GetOrderRequest(id=str(uuid.uuid4())), metadata=metadata, timeout=TIMEOUT
            )
    if outcome == "OK":  # admitted: the call got as far as looking the order up
        assert caught.value.status is Status.NOT_FOUND
    else:
        assert (caught.value.status, caught.value.message) == (Status.UNAUTHENTICATED, outcome)


async def test_an_unknown_method_needs_the_token_before_it_is_refused(token_server: OrderServer) -> None:
    """Else a client without the token could tell which methods the server has, which reflection keeps
    from it."""
    async with Channel("127.0.0.1", token_server.port) as channel:
        for metadata, expected in (
            ({}, Status.UNAUTHENTICATED),
            ({"authorization": f"Bearer {TOKEN}"}, Status.UNIMPLEMENTED),
        ):
            for path in (f"/{SERVICE}/DeleteOrder", "/no.such.Service/Method"):
                request = channel.request(
                    path, Cardinality.UNARY_UNARY, GetOrderRequest, GetOrderRequest, metadata=metadata, timeout=TIMEOUT
                )
                async with request as call:
                    await call.send_message(GetOrderRequest(id=str(uuid.uuid4())), end=True)
                    with pytest.raises(GRPCError) as refused:
                        await call.recv_message()
                assert refused.value.status is expected, (path, refused.value)


async def test_health_is_open_but_reflection_needs_the_token(token_server: OrderServer) -> None:
    async with Channel("127.0.0.1", token_server.port) as channel:
        for service in ("", SERVICE):
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == HealthCheckResponse.SERVING

        async def list_services(metadata: dict[str, str]) -> list[str]:
            async with ServerReflectionStub(channel).ServerReflectionInfo.open(
                metadata=metadata, timeout=TIMEOUT
            ) as stream:
                await stream.send_message(ServerReflectionRequest(list_services=""), end=True)
                reply = await stream.recv_message()
            assert reply is not None
            return [s.name for s in reply.list_services_response.service]

        with pytest.raises(GRPCError) as caught:
            await list_services({})
        assert (caught.value.status, caught.value.message) == (Status.UNAUTHENTICATED, MISSING_TOKEN)
        assert SERVICE in await list_services({"authorization": f"Bearer {TOKEN}"})


async def test_without_a_token_configured_no_call_needs_one() -> None:
    async with running_server() as server, client(server, token=WRONG) as anyone:
        await anyone.create([Item("Pen", 1, 1.0)])  # auth is off by default, and a stray token is ignored


def test_the_guard_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def recording_compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording_compare_digest)
    guard = TokenGuard(TOKEN)

    def admit(header: str) -> None:
        metadata = MultiDict({"authorization": header})
        guard.admit(Call(f"/{SERVICE}/GetOrder", metadata, None, "request-id", None))  # type: ignore[arg-type]

    admit(f"Bearer {TOKEN}")
    with pytest.raises(Unauthenticated):
        admit("Bearer x")
    assert len(compared) == 2
    # Fixed-size digests are compared, so neither the bytes nor the length of the token show in the timing.
    assert all(isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b) == 32 for a, b in compared)
    assert TOKEN not in repr(guard)


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "naïve", "new\nline"])
def test_an_unusable_token_is_refused_without_echoing_it(token: str, database_url: str) -> None:
    with pytest.raises(SecurityConfigError) as server_error:
        OrderServer(ServerConfig(port=0, db=database_url, token=token))
    with pytest.raises(ValueError) as client_error:
        OrderClient("127.0.0.1:1", token=token)
    for error in (server_error.value, client_error.value):
        assert "printable ASCII" in str(error)
        assert not token or token not in str(error)


# --- the token never reaches the log (a real server process at debug level) ----------------------------------


def start_server(
    tmp: Path, db: str, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m orders.server --port 0`` on the fresh database ``db``, stderr to ``tmp/server.log``; and its
    target."""
    with open(tmp / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orders.server", "--port", "0", "--db", db, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
            env={**os.environ, **(env or {})},
        )
    try:
        return process, f"127.0.0.1:{wait_for_start(process)}"
    except BaseException:
        process.kill()
        process.wait()
        raise


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_the_token_never_reaches_the_log(tmp_path: Path, database_url: str, log_format: str) -> None:
    process, target = start_server(
        tmp_path, database_url, "--token", TOKEN, "--log-level", "debug", "--log-format", log_format
    )
    try:
        for token in (None, WRONG):
            async with OrderClient(target, token=token, timeout=TIMEOUT) as refused:
                with pytest.raises(Unauthenticated):
                    await refused.create([Item("Pen", 1, 1.0)])
                with pytest.raises(Unauthenticated):
                    await watch_first(refused)
        async with OrderClient(target, token=TOKEN, timeout=TIMEOUT) as authed:
            order = await authed.create([Item("Pen", 1, 1.0)])
            await authed.get(order.id)
            await watch_first(authed)
    finally:
        assert stop(process) == 0
    assert process.stdout is not None
    log = (tmp_path / "server.log").read_text(errors="replace") + process.stdout.read().decode(errors="replace")
    assert "UNAUTHENTICATED" in log and "OrderStatusStream" in log  # the calls were logged: the check means something
    assert TOKEN not in log
    assert WRONG not in log


# --- TLS ------------------------------------------------------------------------------------------------------


async def exercise_every_rpc(connected: OrderClient) -> None:
    """Every RPC once, the stream included, through ``connected``; fails the test on any error."""
    first = await connected.create([Item("Laptop", 1, 1000.0), Item("Mouse", 2, 25.0)])
    second = await connected.create([Item("Desk", 1, 300.0)])
    assert (await connected.get(first.id)).total_amount == 1050.0
    assert (await connected.update_status(first.id, OrderStatus.CONFIRMED)).version == 2
    assert (await connected.cancel(second.id)).status == OrderStatus.CANCELLED
    listed = [o.id async for o in connected.list(page_size=1)]
    assert listed == [first.id, second.id]
    update = await watch_first(connected)
    assert (update.order_id, update.sequence) == (first.id, 1)


async def test_a_client_trusting_the_ca_uses_every_rpc_over_tls(tls_server: OrderServer, certs: SimpleNamespace):
    async with client(tls_server, ca_file=certs.ca) as connected:
        assert connected.tls
        await exercise_every_rpc(connected)


async def test_a_client_given_an_ssl_context_uses_it(tls_server: OrderServer, certs: SimpleNamespace) -> None:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.set_alpn_protocols(["h2"])
    async with client(tls_server, tls=context) as connected:
        await connected.create([Item("Pen", 1, 1.0)])
    with pytest.raises(ValueError, match="not both"):
        OrderClient("127.0.0.1:1", tls=context, ca_file=certs.ca)


async def test_a_hung_tls_server_is_dropped_promptly_and_the_next_call_connects_afresh(
    tls_server: OrderServer, certs: SimpleNamespace, no_gc: None
) -> None:
    """A ping left unanswered aborts the connection: a graceful TLS close would wait 30 s for the hung peer's
    reply, meanwhile leaving calls on the connection hanging and handing new calls a half-closed one."""
    proxy = FreezingProxy(tls_server.port)  # freezes the connections open now; new ones pass
    async with proxy as target, OrderClient(target, ca_file=certs.ca, keepalive=0.5, timeout=TIMEOUT) as connected:
        order = await connected.create([Item("Pen", 1, 1.0)])
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="nothing arrived for 0.5 s after a keepalive ping"):
            await connected.update_status(order.id, OrderStatus.CONFIRMED, expected_version=order.version)
        assert time.monotonic() - started < PROMPTLY
        assert (await connected.get(order.id)).id == order.id


async def assert_refused_promptly(connected: OrderClient, *fragments: str, watch_reconnects: bool = False) -> None:
    """A unary call and a watch both fail with UNAVAILABLE (retries included) well before the deadline;
    ``watch_reconnects``: a watch left to reconnect, as by default, fails as promptly (no retry can mend it)."""
    started = time.monotonic()
    with pytest.raises(Unavailable) as unary:
        await connected.create([Item("Pen", 1, 1.0)])
    with pytest.raises(Unavailable) as streaming:
        await watch_first(connected, reconnect=watch_reconnects)
    assert time.monotonic() - started < PROMPTLY
    for fragment in fragments:
        assert fragment in unary.value.message and fragment in streaming.value.message


@pytest.mark.parametrize("trust", ["system store", "another CA"])
async def test_a_client_not_trusting_the_ca_is_unavailable(
    tls_server: OrderServer, certs: SimpleNamespace, trust: str
) -> None:
    options: dict[str, Any] = {"tls": True} if trust == "system store" else {"ca_file": certs.other_ca}
    async with client(tls_server, **options) as untrusting:
        await assert_refused_promptly(untrusting, "TLS handshake", "certificate verify failed", watch_reconnects=True)


async def test_a_plaintext_client_against_the_tls_port_fails_promptly(tls_server: OrderServer) -> None:
    async with client(tls_server) as plaintext:
        await assert_refused_promptly(
            plaintext,
            f"the server at {target_of(tls_server)} closed the connection before speaking HTTP/2: it serves TLS",
            "connect with TLS (ca_file or tls=True; --ca-file or --tls on the command line)",
            watch_reconnects=True,
        )


async def test_a_watch_that_would_reconnect_forever_fails_at_once_against_a_tls_server_process(
    tmp_path: Path, database_url: str, certs: SimpleNamespace
) -> None:
    """The server closes a plaintext connection before a word of HTTP/2, as one going down may do: the client
    finds it serving TLS (a handshake completes) and gives up at once, instead of taking it for an outage."""
    server = ServerProcess(tmp_path, database_url, args=["--tls-cert", str(certs.chain), "--tls-key", str(certs.key)])
    await server.start()
    try:
        async with OrderClient(server.target, timeout=TIMEOUT) as plaintext:
            started = time.monotonic()
            with pytest.raises(Unavailable) as watching:
                await watch_first(plaintext, give_up_after=None)
            with pytest.raises(Unavailable) as getting:
                await plaintext.get(str(uuid.uuid4()))
            assert time.monotonic() - started < PROMPTLY
        expected = (
            f"the server at {server.target} closed the connection before speaking HTTP/2: it serves TLS, and this"
            " client connected without it; connect with TLS (ca_file or tls=True; --ca-file or --tls on the"
            " command line)"
        )
        assert watching.value.code == getting.value.code == "UNAVAILABLE"
        assert watching.value.message == getting.value.message == expected
        async with OrderClient(server.target, ca_file=certs.ca, timeout=TIMEOUT) as tls_client:
            await tls_client.create([Item("Pen", 1, 1.0)])  # and the server serves TLS clients all along
    finally:
        await server.kill()


async def test_a_tls_client_against_a_plaintext_server_fails_promptly(certs: SimpleNamespace) -> None:
    async with running_server() as plaintext_server, client(plaintext_server, ca_file=certs.ca) as tls_client:
        await assert_refused_promptly(tls_client, "TLS handshake", watch_reconnects=True)


def handshake(port: int, ca: Path, **settings: Any) -> tuple[str | None, str | None]:
    """TLS version and ALPN protocol a raw TLS client negotiates with ``port``, as ``settings`` allow."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_ciphers("ALL:@SECLEVEL=0")  # let this probe offer old versions; the server must refuse them
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = settings.get("maximum_version", ssl.TLSVersion.MAXIMUM_SUPPORTED)
    context.set_alpn_protocols(settings.get("alpn", ["h2"]))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version(), tls.selected_alpn_protocol()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_the_tls_server_speaks_h2_and_at_least_tls_1_2(tls_server: OrderServer, certs: SimpleNamespace) -> None:
    def probe(**settings: Any) -> tuple[str | None, str | None]:
        return handshake(tls_server.port, certs.ca, **settings)

    run = asyncio.get_running_loop().run_in_executor
    assert await run(None, lambda: probe()) == ("TLSv1.3", "h2")
    assert await run(None, lambda: probe(maximum_version=ssl.TLSVersion.TLSv1_2)) == ("TLSv1.2", "h2")
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError):
            await run(None, lambda old=old: probe(maximum_version=old))


async def test_tls_and_token_together(certs: SimpleNamespace) -> None:
    async with running_server(token=TOKEN, **tls_options(certs)) as server:
        for token, message in ((None, MISSING_TOKEN), (WRONG, INVALID_TOKEN)):
            async with client(server, token=token, ca_file=certs.ca) as refused:
                with pytest.raises(Unauthenticated) as caught:
                    await refused.create([Item("Pen", 1, 1.0)])
                assert caught.value.message == message
                with pytest.raises(Unauthenticated):
                    await watch_first(refused)
        async with client(server, token=TOKEN, ca_file=certs.ca) as authed:
            await exercise_every_rpc(authed)


async def test_a_watch_over_tls_ends_cleanly(
    tls_server: OrderServer, certs: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the access log asked the closed TLS transport for the peer address and crashed instead of
    recording a stream the client had left."""
    caplog.set_level(logging.INFO)
    async with client(tls_server, ca_file=certs.ca) as connected:
        await connected.create([Item("Pen", 1, 1.0)])
        await watch_first(connected)

    def stream_logged() -> bool:
        return any("OrderStatusStream" in r.getMessage() for r in caplog.records if r.name == "orders.access")

    deadline = time.monotonic() + TIMEOUT
    while not stream_logged() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert stream_logged(), [r.getMessage() for r in caplog.records]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("missing", "key", "cannot read the TLS certificate (--tls-cert)"),
        ("chain", "missing", "cannot read the TLS private key (--tls-key)"),
        ("garbage", "key", "must be a PEM certificate chain and its matching unencrypted PEM private key"),
        ("chain", "other_key", "must be a PEM certificate chain and its matching unencrypted PEM private key"),
        ("chain", "encrypted_key", "the TLS private key is encrypted"),
        ("expired", "expired", "expired on 20"),
        ("not_yet_valid", "not_yet_valid", "is not valid until 20"),
    ],
)
def test_unusable_tls_files_fail_at_startup(
    certs: SimpleNamespace, tmp_path: Path, database_url: str, cert: str, key: str, message: str
) -> None:
    def path(name: str) -> str:
        return str(tmp_path / "missing.pem") if name == "missing" else str(getattr(certs, name))

    with pytest.raises(SecurityConfigError) as caught:
        OrderServer(ServerConfig(port=0, db=database_url, tls_cert=path(cert), tls_key=path(key)))
    assert message in str(caught.value)


def test_the_server_process_reports_unreadable_tls_files_in_one_line(
    certs: SimpleNamespace, tmp_path: Path, database_url: str
) -> None:
    missing = tmp_path / "nope.pem"
    command = [sys.executable, "-m", "orders.server", "--port", "0", "--db", database_url]
    command += ["--tls-cert", str(missing), "--tls-key", str(certs.key)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert result.returncode == 1
    assert "Server started" not in result.stdout
    assert result.stderr.strip() == (
        f"orders serve: cannot read the TLS certificate (--tls-cert) {str(missing)!r}: No such file or directory"
    )


@pytest.mark.database_free
@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
async def test_a_server_with_a_token_but_no_tls_warns_when_it_serves_a_network(
    tmp_path: Path, host: str, warned: bool
) -> None:
    """As the client warns before sending a token in clear text to another machine. The TLS flags given
    empty (ORDERS_TLS_CERT=) turn TLS off, so this is the one trace of a mistyped variable."""
    env = {"ORDERS_TOKEN": TOKEN, "ORDERS_TLS_CERT": "", "ORDERS_TLS_KEY": ""}
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path}/orders.db", args=["--host", host], env=env)
    await server.start()
    try:
        warning = f"WARNING orders.server serving {host} with a bearer token but without TLS: the clients' token"
        assert (warning in server.log.read_text()) is warned, server.log.read_text()
    finally:
        await server.kill()


# --- the CLI and the grpcio client against a TLS + token server process --------------------------------------


@pytest.fixture(scope="module")
def secure_target(backend: str, tmp_path_factory: pytest.TempPathFactory, certs: SimpleNamespace) -> Iterator[str]:
    """A server process on a fresh database of the backend, serving TLS (flags) and requiring TOKEN (given as
    ORDERS_TOKEN)."""
    tmp = tmp_path_factory.mktemp("secure-server")
    with temporary_database() as db:
        process, target = start_server(
            tmp, db, "--tls-cert", str(certs.chain), "--tls-key", str(certs.key), env={"ORDERS_TOKEN": TOKEN}
        )
        try:
            yield target
        finally:
            stop(process)
            log = (tmp / "server.log").read_text(errors="replace")
            assert TOKEN not in log and WRONG not in log


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``orders`` console script with ORDERS_* variables only from ``env``."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("ORDERS_")}
    return subprocess.run(
        [ORDERS, *args], capture_output=True, text=True, timeout=TIMEOUT * 3, env={**clean, **(env or {})}
    )


def test_cli_with_ca_file_and_token(secure_target: str, certs: SimpleNamespace) -> None:
    secure = ["--target", secure_target, "--ca-file", str(certs.ca), "--token", TOKEN]
    created = cli("create", "--item", "Globe:1:40.00", "--json", *secure)
    assert created.returncode == 0, created.stderr
    order_id = created.stdout.split('"id": "', 1)[1].split('"', 1)[0]
    got = cli("get", order_id, *secure)
    assert got.returncode == 0, got.stderr
    assert order_id in got.stdout and "40.00 USD" in got.stdout
    watched = cli("watch", order_id, "--after-sequence", "0", "--count", "1", *secure)
    assert watched.returncode == 0, watched.stderr
    assert f" {order_id} (new) -> PENDING at " in watched.stdout


def test_cli_reads_orders_token_and_orders_ca_file(secure_target: str, certs: SimpleNamespace) -> None:
    env = {"ORDERS_TARGET": secure_target, "ORDERS_TOKEN": TOKEN, "ORDERS_CA_FILE": str(certs.ca)}
    result = cli("list", "--limit", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert_fails(cli("get", str(uuid.uuid4()), env=env), "NOT_FOUND")  # authenticated, over TLS


def test_cli_without_the_right_token_is_unauthenticated(secure_target: str, certs: SimpleNamespace) -> None:
    secure = ["--target", secure_target, "--ca-file", str(certs.ca)]
    missing = cli("get", str(uuid.uuid4()), *secure)
    assert_fails(missing, "UNAUTHENTICATED")
    assert missing.stderr == f"error: UNAUTHENTICATED: {MISSING_TOKEN}\n"
    wrong = cli("create", "--item", "Pen:1:1.00", *secure, "--token", WRONG)
    assert_fails(wrong, "UNAUTHENTICATED")
    assert wrong.stderr == f"error: UNAUTHENTICATED: {INVALID_TOKEN}\n"
    assert_fails(cli("watch", *secure, "--token", WRONG), "UNAUTHENTICATED")


@pytest.mark.parametrize("command", ["get", "watch"])
@pytest.mark.parametrize("trust", [[], ["--tls"]], ids=["plaintext", "system-trust-store"])
def test_cli_without_the_ca_is_unavailable(secure_target: str, trust: list[str], command: str) -> None:
    """At once: a watch does not reconnect for all of its --timeout, since no retry can mend this."""
    order_id = [str(uuid.uuid4())] if command == "get" else []
    started = time.monotonic()
    result = cli(command, *order_id, "--target", secure_target, "--token", TOKEN, "--timeout", "20", *trust)
    assert_fails(result, "UNAVAILABLE")
    assert ("TLS handshake" if trust else "it serves TLS, and this client connected without it") in result.stderr
    assert time.monotonic() - started < TIMEOUT


def test_cli_refuses_an_unreadable_ca_file_or_bad_token_as_usage_errors(tmp_path: Path) -> None:
    missing = cli("get", str(uuid.uuid4()), "--ca-file", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2
    assert "argument --ca-file: cannot read" in missing.stderr
    bad = cli("get", str(uuid.uuid4()), env={"ORDERS_TOKEN": "two words"})
    assert bad.returncode == 2
    assert "argument --token" in bad.stderr and "two words" not in bad.stderr


def test_demo_against_a_tls_and_token_server(secure_target: str, certs: SimpleNamespace) -> None:
    result = cli("demo", "--target", secure_target, "--ca-file", str(certs.ca), "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    assert "SHIPPED -> DELIVERED" in result.stdout
    refused = cli("demo", "--target", secure_target, "--ca-file", str(certs.ca))
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED: ")


def test_demo_with_a_token_and_an_embedded_server() -> None:
    result = cli("demo", "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    assert "Started an embedded server" in result.stdout and "SHIPPED -> DELIVERED" in result.stdout


def test_grpcio_client_with_tls_and_token(
    secure_target: str,
    certs: SimpleNamespace,
    pb: SimpleNamespace,  # noqa: F811
) -> None:
    tls = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    request = pb.pb2.CreateOrderRequest(items=[pb.pb2.OrderItem(product_name="Atlas", quantity=1, price=12.5)])
    with grpc.secure_channel(secure_target, tls) as channel:
        stub = pb.grpc.OrderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateOrder(request, timeout=TIMEOUT)
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.OrderStatusStream(pb.pb2.OrderStatusStreamRequest(after_sequence=0), timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.CreateOrder(request, timeout=TIMEOUT, metadata=metadata).order.total_amount == 12.5
    # The idiomatic grpcio way: call credentials that add "authorization: Bearer <token>" to every call.
    credentials = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(TOKEN))
    with grpc.secure_channel(secure_target, credentials) as channel:
        stub = pb.grpc.OrderServiceStub(channel)
        created = stub.CreateOrder(request, timeout=TIMEOUT).order
        stream = stub.OrderStatusStream(pb.pb2.OrderStatusStreamRequest(order_ids=[created.id], after_sequence=0))
        first = next(stream)
        stream.cancel()
        assert (first.order_id, first.status) == (created.id, pb.pb2.ORDER_STATUS_PENDING)


# --- no SQL built from strings --------------------------------------------------------------------------------

SQL_CALLS = {"execute_sql", "raw", "SQL", "execute", "executemany", "executescript"}


def _dynamic_string(node: ast.expr, assignments: dict[str, list[ast.expr]], seen: frozenset[str] = frozenset()) -> str:
    """How ``node`` builds a string at run time (f-string, %, .format, +, join), or "" if it does not."""
    if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
        return "an f-string"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return "%-formatting"
    constants = isinstance(node, ast.BinOp) and all(isinstance(s, ast.Constant) for s in (node.left, node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and not constants:
        return "string concatenation"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
        if _psycopg_composition(node):
            return ""
        return f".{node.func.attr}()"
    if isinstance(node, ast.Name) and node.id not in seen:  # follow a variable assigned in the same scope
        for value in assignments.get(node.id, []):
            if how := _dynamic_string(value, assignments, seen | {node.id}):
                return f"{how} (via {node.id})"
    return ""


def _psycopg_composition(node: ast.Call) -> bool:
    """``sql.SQL("... {} ...").format(sql.Identifier(name))``: psycopg quotes identifiers itself."""

    def called(expr: ast.expr, name: str) -> bool:
        return isinstance(expr, ast.Call) and getattr(expr.func, "attr", getattr(expr.func, "id", "")) == name

    receiver = node.func.value  # type: ignore[attr-defined]
    literal_template = called(receiver, "SQL") and all(isinstance(a, ast.Constant) for a in receiver.args)
    return literal_template and all(called(a, "Identifier") for a in [*node.args, *(k.value for k in node.keywords)])


def find_string_built_sql(source: str, filename: str = "<source>") -> list[str]:
    """Every call to a SQL-taking function whose SQL argument is built by string formatting, in line order."""
    tree = ast.parse(source, filename)
    findings: set[tuple[int, str]] = set()
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        assignments: dict[str, list[ast.expr]] = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assignments.setdefault(target.id, []).append(node.value)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) and node.value:
                assignments.setdefault(node.target.id, []).append(
                    node.value if isinstance(node, ast.AnnAssign) else ast.BinOp(node.target, node.op, node.value)
                )
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in SQL_CALLS:
                continue
            arguments = node.args[:1] + [k.value for k in node.keywords if k.arg in ("sql", "query")]
            for argument in arguments:
                if how := _dynamic_string(argument, assignments):
                    findings.add((node.lineno, f"{filename}:{node.lineno}: {name}() gets SQL built by {how}"))
    return [finding for _, finding in sorted(findings)]


def test_the_sql_scanner_finds_every_kind_of_string_built_sql() -> None:
    bad = """
db.execute_sql(f"SELECT * FROM t WHERE id = {order_id}")
db.execute_sql("SELECT * FROM t WHERE id = '%s'" % order_id)
Model.raw("SELECT * FROM t WHERE id = {}".format(order_id))
peewee.SQL("status = " + status)
cursor.execute(sql="DELETE FROM t WHERE id = " + order_id)
admin.execute(sql.SQL("DROP DATABASE {}").format(name))
def query(order_id):
    statement = f"SELECT * FROM t WHERE id = {order_id}"
    return db.execute_sql(statement)
def query2(ids):
    sql: str = "SELECT * FROM t WHERE id IN ("
    sql += ",".join(ids)
    return db.cursor().execute(sql)
"""
    assert [line.split(": ", 1)[0] for line in find_string_built_sql(bad)] == [
        f"<source>:{n}" for n in (2, 3, 4, 5, 6, 7, 10, 14)
    ]
    good = """
db.execute_sql("SELECT * FROM t WHERE id = ?", (order_id,))
Model.raw("SELECT * FROM t WHERE id = ?", order_id)
peewee.SQL("status = ?", [status])
query.execute()
db.execute_sql("SELECT 1 " "FROM t")
admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
"""
    assert find_string_built_sql(good) == []


def test_no_sql_is_built_by_string_formatting_anywhere_in_the_package() -> None:
    package = Path(orders.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert package / "storage.py" in sources  # the scan covers the one module that talks to the database
    findings = [
        finding
        for source in sources
        for finding in find_string_built_sql(source.read_text(), str(source.relative_to(package.parent)))
    ]
    assert findings == []
