"""The ``orders`` console script, run as a real process against a real server process over a real socket."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trustme
from server_process import free_port

from orders.config import add_server_arguments, config_from_args
from orders.testing import temporary_database

ORDERS = str(Path(sys.executable).parent / "orders")
STARTED = "Server started on port "
TIMEOUT = 20


def _default_sigint() -> None:
    # A child of a background job inherits SIGINT as ignored; give it the handler a terminal user has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Without PYTHONUNBUFFERED the child's stdout is block-buffered, as for any user piping its output, so a
# line only arrives while the process runs if the code flushed it.
BUFFERED_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


def spawn(*args: str, stderr: object = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start a long-running process; our end of its stdout is unbuffered, so read_line never hides data."""
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=stderr, bufsize=0, env=BUFFERED_ENV, preexec_fn=_default_sigint
    )


def read_line(process: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> str:
    """The next line the process prints, failing the test if none arrives within ``timeout``."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    line = process.stdout.readline().decode()
    assert line, f"process exited with {process.wait()} before printing a line"
    return line.rstrip("\n")


def wait_for_start(process: subprocess.Popen[bytes]) -> int:
    """Read until the ``Server started on port N`` line and return N."""
    line = read_line(process)
    assert line.startswith(STARTED), line
    return int(line.removeprefix(STARTED))


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM the process and return its exit code (killing it if it hangs)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def target(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a ``python -m orders.server`` process on a fresh temporary database of the backend."""
    tmp = tmp_path_factory.mktemp("cli")
    with temporary_database() as db, open(tmp / "server.log", "wb") as log:
        server = spawn(sys.executable, "-m", "orders.server", "--port", "0", "--db", db, stderr=log)
        try:
            yield f"127.0.0.1:{wait_for_start(server)}"
        finally:
            stop(server)


def orders(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``orders`` console script to completion."""
    return subprocess.run([ORDERS, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)


def call(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a client command against ``target``."""
    return orders(*args, "--target", target)


def call_json(target: str, *args: str) -> list[dict]:
    """Run a client command with ``--json``; it must succeed; return the objects it printed."""
    result = call(target, *args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def create(target: str, *items: str) -> dict:
    """Create an order through the CLI and return it as JSON."""
    flags = [arg for item in items for arg in ("--item", item)]
    [order] = call_json(target, "create", *flags)
    return order


def assert_fails(result: subprocess.CompletedProcess[str], code: str) -> None:
    """The command failed with a server error of this status code, reported in one clean line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: {code}: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- create / get --------------------------------------------------------------------------------------


def test_create_json_computes_total_and_keeps_colons_in_names(target: str) -> None:
    [order] = call_json(
        target, "create", "--item", "Laptop:1:1000.00", "--item", "Cable: USB-C:2:25.00", "--currency", "EUR"
    )
    assert order["status"] == "ORDER_STATUS_PENDING"
    assert order["totalAmount"] == 1050.0
    assert order["currencyCode"] == "EUR"
    assert int(order["version"]) == 1
    assert [(i["productName"], i["quantity"], i["price"]) for i in order["items"]] == [
        ("Laptop", 1, 1000.0),
        ("Cable: USB-C", 2, 25.0),
    ]
    uuid.UUID(order["id"])


def test_create_human_output(target: str) -> None:
    result = call(target, "create", "--item", "Laptop:1:1000.00", "--item", "Mouse:2:25.00", "--total", "1050")
    assert result.returncode == 0, result.stderr
    header, *rest = result.stdout.splitlines()
    assert header.startswith("order ")
    assert "PENDING" in header and "v1" in header and "1050.00 USD" in header
    assert "  1 x Laptop @ 1000.00 USD" in rest
    assert "  2 x Mouse @ 25.00 USD" in rest


def test_create_with_request_id_is_idempotent(target: str) -> None:
    key = str(uuid.uuid4())
    [first] = call_json(target, "create", "--item", "Pen:3:1.25", "--request-id", key)
    [again] = call_json(target, "create", "--item", "Pen:3:1.25", "--request-id", key)
    assert again["id"] == first["id"]
    assert_fails(call(target, "create", "--item", "Pen:4:1.25", "--request-id", key), "ALREADY_EXISTS")


def test_create_wrong_total_is_invalid_argument(target: str) -> None:
    assert_fails(call(target, "create", "--item", "Laptop:1:1000.00", "--total", "999"), "INVALID_ARGUMENT")


def test_get_returns_what_create_returned(target: str) -> None:
    order = create(target, "Desk:1:300.00")
    assert call_json(target, "get", order["id"]) == [order]
    human = call(target, "get", order["id"])
    assert human.returncode == 0
    assert order["id"] in human.stdout and "300.00 USD" in human.stdout


@pytest.mark.parametrize(
    ("order_id", "code"),
    [("00000000-0000-4000-8000-000000000000", "NOT_FOUND"), ("not-a-uuid", "INVALID_ARGUMENT")],
)
def test_get_errors(target: str, order_id: str, code: str) -> None:
    assert_fails(call(target, "get", order_id), code)


@pytest.mark.parametrize("item", ["Laptop", "Laptop:1", "Laptop:one:1.00", "Laptop:1:cheap", ":1.5:2"])
def test_malformed_item_is_a_usage_error(target: str, item: str) -> None:
    result = call(target, "create", "--item", item)
    assert result.returncode == 2
    message = result.stderr.splitlines()[-1]
    assert "argument --item" in message and "NAME:QUANTITY:PRICE" in message and repr(item) in message
    assert "Traceback" not in result.stderr


def test_unknown_status_is_a_usage_error(target: str) -> None:
    result = call(target, "update", str(uuid.uuid4()), "teleported")
    assert result.returncode == 2
    assert "unknown status 'teleported'" in result.stderr


# --- update / cancel -----------------------------------------------------------------------------------


def test_update_through_the_lifecycle(target: str) -> None:
    order = create(target, "Chair:4:50.00")
    versions = []
    for status in ("confirmed", "ORDER_STATUS_SHIPPED", "Delivered"):
        [updated] = call_json(target, "update", order["id"], status)
        versions.append((updated["status"], int(updated["version"])))
    assert versions == [("ORDER_STATUS_CONFIRMED", 2), ("ORDER_STATUS_SHIPPED", 3), ("ORDER_STATUS_DELIVERED", 4)]
    human = call(target, "get", order["id"])
    assert "DELIVERED" in human.stdout and "v4" in human.stdout
    assert_fails(call(target, "update", order["id"], "pending"), "FAILED_PRECONDITION")
    assert_fails(call(target, "cancel", order["id"]), "FAILED_PRECONDITION")


def test_illegal_transition_names_both_statuses(target: str) -> None:
    order = create(target, "Lamp:1:20.00")
    result = call(target, "update", order["id"], "delivered")
    assert_fails(result, "FAILED_PRECONDITION")
    assert "PENDING" in result.stderr and "DELIVERED" in result.stderr


def test_cancel_with_expected_version(target: str) -> None:
    order = create(target, "Sofa:1:800.00")
    assert_fails(call(target, "cancel", order["id"], "--expected-version", "7"), "ABORTED")
    result = call(target, "cancel", order["id"], "--expected-version", "1")
    assert result.returncode == 0, result.stderr
    assert "CANCELLED" in result.stdout and "v2" in result.stdout
    [again] = call_json(target, "cancel", order["id"])
    assert (again["status"], again["version"]) == ("ORDER_STATUS_CANCELLED", "2")


# --- list ----------------------------------------------------------------------------------------------


def test_list_pages_lazily_and_filters(target: str) -> None:
    made = [create(target, f"Book {n}:1:10.00")["id"] for n in range(3)]
    call_json(target, "update", made[1], "confirmed")
    small_pages = [o["id"] for o in call_json(target, "list", "--page-size", "1")]
    one_page = [o["id"] for o in call_json(target, "list", "--page-size", "1000")]
    assert small_pages == one_page
    assert [i for i in small_pages if i in made] == made  # oldest first
    confirmed = call_json(target, "list", "--status", "confirmed", "--page-size", "2")
    assert made[1] in [o["id"] for o in confirmed]
    assert {o["status"] for o in confirmed} == {"ORDER_STATUS_CONFIRMED"}
    either = call_json(target, "list", "--status", "pending", "--status", "confirmed")  # as README shows
    assert {o["status"] for o in either} == {"ORDER_STATUS_PENDING", "ORDER_STATUS_CONFIRMED"}
    assert len(call_json(target, "list", "--limit", "2", "--page-size", "1")) == 2


def test_list_human_output_is_one_line_per_order(target: str) -> None:
    order = create(target, "Rug:2:35.50")
    result = call(target, "list", "--status", "pending", "cancelled")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if order["id"] in line]
    assert "PENDING" in line and "71.00 USD" in line and "v1" in line


# --- watch ---------------------------------------------------------------------------------------------


def test_watch_prints_each_update_as_it_arrives(target: str) -> None:
    order = create(target, "Bike:1:500.00")
    watch = spawn(ORDERS, "watch", order["id"], "--after-sequence", "0", "--count", "3", "--json", "--target", target)
    try:
        # Each line must arrive while the watch keeps running: this only passes if every line is flushed.
        created = json.loads(read_line(watch))
        assert (created["orderId"], created["previousStatus"], created["status"]) == (
            order["id"],
            "ORDER_STATUS_UNSPECIFIED",
            "ORDER_STATUS_PENDING",
        )
        call_json(target, "update", order["id"], "confirmed")
        confirmed = json.loads(read_line(watch))
        assert (confirmed["previousStatus"], confirmed["status"]) == ("ORDER_STATUS_PENDING", "ORDER_STATUS_CONFIRMED")
        assert int(confirmed["sequence"]) > int(created["sequence"])
        call_json(target, "cancel", order["id"])
        cancelled = json.loads(read_line(watch))
        assert cancelled["status"] == "ORDER_STATUS_CANCELLED"
        assert watch.wait(TIMEOUT) == 0  # --count 3 reached
    finally:
        stop(watch)


def test_watch_human_output(target: str) -> None:
    order = create(target, "Kite:1:15.00")
    result = call(target, "watch", order["id"], "--after-sequence", "0", "--count", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seq=")
    assert f" {order['id']} (new) -> PENDING at " in result.stdout


def test_watch_takes_ids_before_and_after_its_options(target: str) -> None:
    first, second, other = (create(target, f"Part {n}:1:1.00") for n in range(3))
    result = call(target, "watch", first["id"], "--after-sequence", "0", second["id"], "--count", "2", "--json")
    assert result.returncode == 0, result.stderr
    watched = [json.loads(line)["orderId"] for line in result.stdout.splitlines()]
    assert watched == [first["id"], second["id"]] and other["id"] not in watched


def test_watch_can_show_heartbeats_as_cursors_to_resume_from(target: str) -> None:
    order = create(target, "Lamp:1:30.00")
    arguments = ("watch", order["id"], "--heartbeat", "1", "--show-heartbeats", "--count", "1", "--target", target)
    text = spawn(ORDERS, *arguments)
    as_json = spawn(ORDERS, *arguments, "--json")
    try:
        heartbeat = read_line(text)
        assert re.fullmatch(r"seq=\d+ heartbeat", heartbeat), heartbeat
        cursor = json.loads(read_line(as_json))
        assert cursor["orderId"] == "" and int(cursor["sequence"]) >= int(heartbeat.split()[0].removeprefix("seq="))
        call_json(target, "update", order["id"], "confirmed")
        assert json.loads(read_line(as_json))["status"] == "ORDER_STATUS_CONFIRMED"
        assert as_json.wait(TIMEOUT) == 0  # --count 1 counts the update, not the heartbeats
        resumed = call_json(target, "watch", order["id"], "--after-sequence", cursor["sequence"], "--count", "1")
        assert resumed[0]["status"] == "ORDER_STATUS_CONFIRMED"  # nothing between the cursor and the change
    finally:
        stop(text)
        stop(as_json)


def test_watch_ctrl_c_exits_130_quietly(target: str) -> None:
    create(target, "Drum:1:99.00")
    watch = spawn(ORDERS, "watch", "--after-sequence", "0", "--target", target)
    try:
        read_line(watch)  # it is streaming
        watch.send_signal(signal.SIGINT)
        assert watch.wait(TIMEOUT) == 130
        assert watch.stderr is not None and watch.stderr.read() == b""
    finally:
        stop(watch)


@contextlib.contextmanager
def dropping_listener() -> Iterator[str]:
    """A target that accepts connections and drops each as soon as the client has sent something."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drop_each() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                connection.recv(1)

    dropper = threading.Thread(target=drop_each, daemon=True)
    dropper.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_ctrl_c_after_a_lost_connection_still_exits_130_quietly(target: str) -> None:
    """grpclib ends a call on a lost connection by cancelling its task; a later Ctrl-C must still be one."""
    create(target, "Drum:1:99.00")
    with dropping_listener() as dropping:
        watch = spawn(ORDERS, "watch", "--after-sequence", "0", "--target", f"{dropping},{target}")
        try:
            read_line(watch)  # streaming, from the second target
            watch.send_signal(signal.SIGINT)
            assert watch.wait(TIMEOUT) == 130
            assert watch.stderr is not None and watch.stderr.read() == b""
        finally:
            stop(watch)


def test_watch_errors(target: str) -> None:
    assert_fails(call(target, "watch", "not-a-uuid"), "INVALID_ARGUMENT")
    assert_fails(call(target, "watch", "--after-sequence", "99999999"), "OUT_OF_RANGE")


# --- connection and environment ------------------------------------------------------------------------


def test_unreachable_server_is_unavailable_without_traceback() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert_fails(orders("get", str(uuid.uuid4()), "--target", f"127.0.0.1:{port}", "--timeout", "2"), "UNAVAILABLE")


def test_target_defaults_to_orders_target_env(target: str) -> None:
    result = orders("get", "00000000-0000-4000-8000-000000000001", env={**os.environ, "ORDERS_TARGET": target})
    assert_fails(result, "NOT_FOUND")
    unset_target = {**os.environ, "ORDERS_TARGET": ""}
    unset = orders("get", "00000000-0000-4000-8000-000000000001", "--timeout", "1", env=unset_target)
    assert unset.returncode == 1 and "argument --target" not in unset.stderr, unset.stderr  # empty is unset


def test_client_commands_start_without_loading_the_server_or_the_database_layer() -> None:
    # Every client command pays for what the CLI imports: the server, peewee and the database drivers
    # (more than half of a client command's start-up) are imported only by serve and demo.
    code = "import sys, orders.cli; print(sorted({'orders.server', 'orders.storage', 'peewee'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert result.stdout.strip() == "[]"


def test_bad_target_is_a_usage_error() -> None:
    result = orders("get", str(uuid.uuid4()), "--target", "no-port-here")
    assert result.returncode == 2
    assert "host:port" in result.stderr


# --- serve / demo / python -m orders -------------------------------------------------------------------


def test_serve_prints_started_line_and_exits_0_on_sigterm(database_url: str) -> None:
    server = spawn(ORDERS, "serve", "--port", "0", "--db", database_url, stderr=subprocess.DEVNULL)
    try:
        port = wait_for_start(server)
        assert_fails(call(f"127.0.0.1:{port}", "get", str(uuid.uuid4())), "NOT_FOUND")  # it really serves
    finally:
        assert stop(server) == 0


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--db", "orders.db"], "--db: the database is given as a URL: for the SQLite file orders.db give sqlite:///"),
        (["--db", "mysql://root:hunter2@127.0.0.1/test"], "--db: mysql:// is not a database this server runs on"),
        (["--db", "sqlite:///:memory:"], "--db: an in-memory SQLite database cannot serve"),
        (["--db", "postgresql://u:hunter2@127.0.0.1:99999/db"], "has a port that is not a number from 0 to 65535"),
        # a password's / or # not percent-encoded: urlsplit takes what precedes it for the host and port
        (["--db", "postgresql://u:hunter2/x@db:5432/orders"], "postgresql://***@db:5432/orders has a port that is"),
        (["--db", "postgresql://u:hunter2#x@db/orders"], "(percent-encode any / ? # @ % in the user or password"),
        (["--db", "postgresql://u:12/hunter2@db/orders"], "postgresql://***@db/orders has a user in its path"),
        (["--db", "postgresql://u:hunter2@127.0.0.1:5432/"], "names no database"),
        (["--db", "postgresql//u:hunter2@db/orders"], "postgresql//u:***@db/orders is not a URL (no scheme: is a ':"),
        (["--db", "postgresql:/u:hunter2@db/orders"], "postgresql:/u:***@db/orders has a user in its path"),
        (["--token="], "argument --token: is empty"),
        (["--host="], "--host is empty"),
        (["--port", "-1"], "--port must be a port from 0 to 65535, not -1"),
        (["--workers", "3", "--metrics-port", "65534"], "--metrics-port must be a port from 0 to 65535 (and the 2"),
        (["--port", "50999", "--metrics-port", "50999"], "--metrics-port 50999 takes port 50999"),
        (["--grace", "nan"], "--grace must be 0 or more seconds"),
        (["--max-watchers", "-1"], "--max-watchers must be 0 or more"),
        (["--max-message-bytes", "0"], "--max-message-bytes must be 1 or more, not 0"),
        (["--log-level", "verbose"], "argument --log-level: 'verbose' is not one of debug, info, warning, error\n"),
        (["--metrics-port", "x"], "argument --metrics-port: invalid port value: 'x'\n"),
        (["--workers", "0"], "--workers must be 1 or more"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_serve_flags_that_make_no_server_are_usage_errors_that_say_what_to_give(flags: list[str], says: str) -> None:
    result = orders("serve", "--port", "0", *flags)
    assert result.returncode == 2, result.stderr
    assert "orders serve: error: " in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert result.stdout == ""


@pytest.mark.database_free
def test_log_level_and_format_are_read_in_any_case() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    config = config_from_args(parser.parse_args(["--log-level", "DEBUG", "--log-format", "Json"]), parser)
    assert (config.log_level, config.log_format) == ("debug", "json")


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"ORDERS_PORT": "abc"}, "argument --port: invalid int value: 'abc' (from ORDERS_PORT)"),
        ({"ORDERS_METRICS_PORT": "x"}, "argument --metrics-port: invalid port value: 'x' (from ORDERS_METRICS_PORT)"),
        ({"ORDERS_LOG_FORMAT": "xml"}, "--log-format: 'xml' is not one of text, json (from ORDERS_LOG_FORMAT)"),
        ({"ORDERS_TOKEN": ""}, "argument --token: is empty"),
        ({"ORDERS_TOKEN": "a b"}, "argument --token: the bearer token must be non-empty printable ASCII"),
        ({"ORDERS_DB": ""}, "--db: no database given"),
        ({"ORDERS_DB": "postgresql://u:hunter2[@db/orders"}, "--db: not a URL (Invalid IPv6 URL)"),
    ],
)
def test_a_bad_environment_variable_is_a_usage_error_of_serve_alone(env: dict[str, str], says: str) -> None:
    environment = {**os.environ, "ORDERS_PORT": "0", **env}
    result = orders("serve", env=environment)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    help_text = orders("--help", env=environment)  # other commands do not read the server's variables
    assert help_text.returncode == 0, help_text.stderr


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://orders:hunter2@db:5432/orders?password=hunter2", "postgresql://orders:***@db:5432/orders?password=***"),
        ("postgresql//orders:hunter2@db:5432/orders", "postgresql//orders:***@db:5432/orders"),  # mistyped
        ("postgresql://orders:hunter2/x@db:5432/orders", "postgresql://***@db:5432/orders"),  # a / not encoded
    ],
)
def test_serve_help_hides_the_database_password(url: str, shown: str) -> None:
    result = orders("serve", "--help", env={**os.environ, "ORDERS_DB": url})
    assert result.returncode == 0
    assert "hunter2" not in result.stdout and shown in " ".join(result.stdout.split()), result.stdout


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("db", "says"),
    [
        ("sqlite:////no/such/directory/orders.db", "cannot use it: the database's directory does not exist\n"),
        ("sqlite:///{tmp}/not-a-database.db", "is unusable: file is not a database"),
        ("postgresql://u@127.0.0.1:1/db?password=hunter2", "is unusable: cannot reach it"),
    ],
)
def test_serve_with_a_database_it_cannot_open_says_why_in_one_line(db: str, says: str, tmp_path: Path) -> None:
    (tmp_path / "not-a-database.db").write_text("a text file")
    result = orders("serve", "--port", "0", "--db", db.format(tmp=tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("orders serve: ") and says in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # PostgreSQL's own message has two lines
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert result.stdout == ""


@pytest.mark.database_free
def test_a_port_a_second_server_cannot_have_is_refused_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = orders("serve", "--port", "0", "--metrics-port", str(port), "--db", f"sqlite:///{tmp_path / 'o.db'}")
    assert result.returncode == 1
    assert f"--metrics-port {port}: Address already in use" in result.stderr, result.stderr


@pytest.mark.database_free
def test_client_flags_are_checked_before_connecting(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    refused = orders("list", "--ca-file", str(not_pem))
    assert refused.returncode == 2 and "must hold PEM certificates" in refused.stderr, refused.stderr
    endless = orders("list", "--timeout", "inf")
    assert endless.returncode == 2 and "--timeout: must be a finite number" in endless.stderr, endless.stderr


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["create", "--item", "A:2147483648:1"], "QUANTITY must be at most 2,147,483,647"),
        (["list", "--page-size", "2147483648"], "--page-size: must be from 0 to 2,147,483,647"),
        (["watch", "--heartbeat", "2147483648"], "--heartbeat: must be from 0 to 2,147,483,647"),
        (["watch", "--after-sequence", str(2**63)], "--after-sequence: must be from 0 to 9,223,372,036,854,775,807"),
        (["update", str(uuid.uuid4()), "confirmed", "--expected-version", str(2**63)], "--expected-version: must"),
        (["get", str(uuid.uuid4()), "extra"], "unrecognized arguments: extra"),
        (["demo", "--json"], "unrecognized arguments: --json"),
        (["demo", "--tls"], "--ca-file and --tls need --target"),
    ],
)
def test_arguments_the_wire_cannot_carry_or_nobody_reads_are_usage_errors_of_their_command(
    args: list[str], says: str
) -> None:
    result = orders(*args)  # nothing listens on the default target: none of these may get as far
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"usage: orders {args[0]} ") and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.database_free
@pytest.mark.parametrize("command", [[ORDERS, "bench"], [sys.executable, "-m", "bench"]])
def test_the_benchmark_names_itself_as_it_was_invoked(command: list[str]) -> None:
    result = subprocess.run([*command, "--scenarios", "nope"], capture_output=True, text=True, timeout=TIMEOUT)
    name = "orders bench" if command[0] == ORDERS else "python -m bench"
    assert result.returncode == 2 and result.stderr.startswith(f"usage: {name} "), result.stderr
    assert f"{name}: error: unknown scenario(s) nope" in result.stderr


@pytest.mark.database_free
def test_a_client_command_ignores_the_server_only_variables_even_malformed() -> None:
    environment = {**os.environ, "ORDERS_DB": "postgresql://u:hunter2[@db/orders", "ORDERS_PORT": "abc"}
    for command in (["--help"], ["list", "--help"], ["list", "--limit", "0", "--target", f"127.0.0.1:{free_port()}"]):
        result = orders(*command, env=environment)  # --limit 0 lists nothing, so it calls no server
        assert result.returncode == 0, (command, result.stderr)
        assert "hunter2" not in result.stdout + result.stderr


def test_output_that_cannot_be_written_is_one_error_line(target: str) -> None:
    create(target, "Drum:1:99.00")
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [ORDERS, "list", "--target", target], stdout=full, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT
        )
    assert result.returncode == 1
    assert result.stderr == "error: cannot write the output: [Errno 28] No space left on device\n", result.stderr


@pytest.mark.database_free
def test_version() -> None:
    result = orders("--version")
    assert result.returncode == 0 and result.stdout == f"orders {importlib.metadata.version('orders')}\n"


@pytest.mark.database_free
def test_a_demo_whose_output_cannot_be_written_is_one_error_line() -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run([ORDERS, "demo"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr == "error: cannot write the output: [Errno 28] No space left on device\n", result.stderr


@pytest.mark.database_free
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "two workers"])
@pytest.mark.parametrize("stdout", ["a full disk", "a closed pipe"])
def test_a_server_that_cannot_print_its_startup_line_exits_saying_so(
    tmp_path: Path, workers: list[str], stdout: str
) -> None:
    """Whoever started it waits for that line; rather than serve unannounced (or, as it did, exit 0 without
    a word on a closed pipe, or keep its workers running and ignore SIGTERM), it stops and says why."""
    port = free_port()
    command = [ORDERS, "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'orders.db'}", *workers]
    with contextlib.ExitStack() as closing:
        if stdout == "a full disk":
            output: int | IO[str] = closing.enter_context(open("/dev/full", "w"))
            error = "[Errno 28] No space left on device"
        else:
            read_end, output = os.pipe()
            os.close(read_end)
            closing.callback(os.close, output)
            error = "[Errno 32] Broken pipe"
        result = subprocess.run(command, stdout=output, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.endswith(f"orders serve: cannot write the startup line to standard output: {error}\n")
    assert "Traceback" not in result.stderr, result.stderr
    with socket.socket() as probe:  # nothing is left serving on the port
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_watch_without_reconnecting_still_moves_on_from_a_refused_target(target: str) -> None:
    created = create(target, "Drum:1:99.00")
    refused = f"127.0.0.1:{free_port()}"
    watch = ["watch", created["id"], "--after-sequence", "0", "--count", "1", "--no-reconnect"]
    updates = call_json(f"{refused},{target}", *watch)
    assert [u["orderId"] for u in updates] == [created["id"]]


@pytest.mark.parametrize("readable", [True, False], ids=["a CA file", "a path that is not there"])
def test_demo_leaves_orders_ca_file_to_remote_servers(tmp_path: Path, readable: bool) -> None:
    """ORDERS_CA_FILE set for the user's real servers must not stop the embedded demo, nor be read by it."""
    if readable:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    result = orders("demo", env={**os.environ, "ORDERS_CA_FILE": str(tmp_path / "ca.pem")})
    assert result.returncode == 0, result.stderr


@pytest.mark.database_free
def test_demo_with_a_target_reads_orders_ca_file(tmp_path: Path) -> None:
    result = orders(
        "demo", "--target", f"127.0.0.1:{free_port()}", env={**os.environ, "ORDERS_CA_FILE": str(tmp_path / "no.pem")}
    )
    assert result.returncode == 2, result.stderr
    assert "argument --ca-file: cannot read the CA file" in result.stderr


@pytest.mark.database_free
def test_watch_gives_up_on_an_unreachable_server_after_its_timeout() -> None:
    started = time.monotonic()
    result = orders("watch", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert_fails(result, "UNAVAILABLE")
    assert time.monotonic() - started < 8


def test_demo_exercises_every_rpc_with_a_live_watch() -> None:
    result = orders("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Started an embedded server on port" in out
    for rpc in ("CreateOrder", "GetOrder", "ListOrders", "UpdateOrderStatus", "CancelOrder", "OrderStatusStream"):
        assert f"== {rpc}" in out, rpc
    assert "page 1: 2 orders" in out and "page 2: 1 order," in out
    assert "refused as expected: FAILED_PRECONDITION" in out
    assert "(same as the first: True)" in out
    assert re.search(r"^  \[watch\] live: the server's event log is at sequence [1-9]\d*$", out, re.MULTILINE)
    watch_lines = [line for line in out.splitlines() if line.startswith("  [watch] seq=")]
    watched = [re.fullmatch(r"  \[watch\] seq=\d+ ([0-9a-f]{8}) (.+) at \S+", line).groups() for line in watch_lines]
    assert [change for _, change in watched] == [
        "PENDING -> CONFIRMED",
        "CONFIRMED -> SHIPPED",
        "SHIPPED -> DELIVERED",
        "PENDING -> CANCELLED",
    ]
    assert out.index("[watch] live") < out.index("== UpdateOrderStatus")
    # Live: each change's watch line comes after the narration of the change that caused it.
    assert out.index("is now CONFIRMED") < out.index("PENDING -> CONFIRMED")
    assert "Traceback" not in result.stderr


def test_demo_against_a_running_server(target: str) -> None:
    result = orders("demo", "--target", target)
    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stdout
    assert "SHIPPED -> DELIVERED" in result.stdout


def test_demo_against_a_server_whose_log_retention_has_pruned_its_start(tmp_path: Path, database_url: str) -> None:
    command = [sys.executable, "-m", "orders.server", "--port", "0", "--db", database_url, "--retention-events", "2"]
    with open(tmp_path / "server.log", "wb") as log:
        server = spawn(*command, stderr=log)
        try:
            target = f"127.0.0.1:{wait_for_start(server)}"
            for _ in range(3):  # sequences 1 to 3, of which the log keeps 2 and 3
                assert call(target, "create", "--item", "Pen:1:2.50").returncode == 0
            result = orders("demo", "--target", target)
        finally:
            stop(server)
    assert result.returncode == 0, result.stderr
    assert "PENDING -> CANCELLED" in result.stdout


def test_python_dash_m_orders_is_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "orders", "--help"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0
    for command in ("serve", "demo", "create", "get", "list", "update", "cancel", "watch"):
        assert command in result.stdout
