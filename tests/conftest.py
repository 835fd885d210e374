"""Shared fixtures: a real server on a fresh database, reached over a real socket.

Every test that can touch a database runs twice, on SQLite and on PostgreSQL (``backend``): servers the
test starts get a fresh database of that kind from :func:`orders.testing.temporary_database`. PostgreSQL
is ``$ORDERS_TEST_POSTGRES`` (default: this machine's, ``postgresql://postgres@127.0.0.1:5432/test``).
Without a reachable PostgreSQL its half is skipped with the reason, unless ``ORDERS_REQUIRE_POSTGRES=1``
(as ``.ci/run`` sets) makes that a failure. A module of pure logic opts out with
``pytestmark = pytest.mark.database_free``; one about PostgreSQL alone with ``postgresql_only``.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from grpclib.client import Channel
from hypothesis import HealthCheck, settings

from orders._proto.orders.v1 import OrderServiceStub
from orders.client import OrderClient
from orders.server import OrderServer
from orders.testing import DATABASE_ENV, running_server, temporary_database

POSTGRES = os.environ.get("ORDERS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

# The tests' own variables; every other ORDERS_* one configures the server or the CLI, and one left set
# in a developer's shell (ORDERS_TARGET, ORDERS_TOKEN, ...) would reach the servers and commands the
# tests start.
TEST_VARIABLES = {
    "ORDERS_TEST_POSTGRES",
    "ORDERS_REQUIRE_POSTGRES",
    "ORDERS_CAMPAIGN",
    "ORDERS_CRASH_SEED",
    DATABASE_ENV,
}
for _name in [name for name in os.environ if name.startswith("ORDERS_") and name not in TEST_VARIABLES]:
    del os.environ[_name]
BACKENDS = ("sqlite", "postgresql")

# The properties tested are about values, not speed: without this, Hypothesis's 200 ms deadline (lifted
# only where it detects a CI service by its environment) fails a test on one example slowed by a loaded
# machine, as "Unreliable test timings".
settings.register_profile("orders", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("orders")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "database_free: pure logic; run once, not once per database backend")
    config.addinivalue_line("markers", "postgresql_only: about a PostgreSQL mechanism; not run on SQLite")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("database_free"):
        backends = ["postgresql"] if metafunc.definition.get_closest_marker("postgresql_only") else BACKENDS
        # Session scope: every SQLite test runs first, then every PostgreSQL one, so module- and
        # session-scoped fixtures (a server shared by a module, say) are built once per backend.
        metafunc.parametrize("backend", backends, indirect=True, scope="session")


@functools.cache
def postgres_unreachable() -> str | None:
    """Why PostgreSQL at ``POSTGRES`` cannot be used, or None."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL at {POSTGRES} ({exc}); set ORDERS_TEST_POSTGRES"
    return None


@pytest.fixture(scope="session", autouse=True)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The database backend this test runs on; sets ``ORDERS_TEST_DATABASE`` for temporary_database()."""
    name: str = getattr(request, "param", "sqlite")
    if name == "postgresql" and (reason := postgres_unreachable()):
        if os.environ.get("ORDERS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"ORDERS_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(DATABASE_ENV, POSTGRES if name == "postgresql" else "sqlite")
        yield name


@pytest.fixture
def database_url(backend: str) -> Iterator[str]:
    """A fresh, empty database of this test's backend, for servers the test starts itself."""
    with temporary_database() as url:
        yield url


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The garbage collector off for the test, so that a collection neither finalises something at a moment
    the test depends on (a dropped, unclosed stream generator) nor pauses the event loop longer than a
    timing under test (a keepalive) on a large heap."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
async def server() -> AsyncIterator[OrderServer]:
    """A running server on a free port and a fresh database."""
    async with running_server() as running:
        yield running


@pytest.fixture
async def client(server: OrderServer) -> AsyncIterator[OrderClient]:
    """The library client connected to ``server``."""
    async with OrderClient(f"127.0.0.1:{server.port}") as connected:
        yield connected


@pytest.fixture
async def stub(server: OrderServer) -> AsyncIterator[OrderServiceStub]:
    """A raw generated stub connected to ``server``, for sending exactly the bytes a test wants."""
    channel = Channel("127.0.0.1", server.port)
    try:
        yield OrderServiceStub(channel)
    finally:
        channel.close()
