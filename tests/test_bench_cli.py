"""``python -m bench`` as a process: usage errors before anything runs, a clean stop on SIGTERM and Ctrl-C,
the table before the JSON, and what the report says about the servers and the command line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from bench import report, run
from bench.load import LoadResult
from bench.procs import ResourceSampler, ServerProcess, Used, process_tree
from orders.testing import DATABASE_ENV

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0  # seconds any bench process may take here before the test fails instead of hanging
SHORT = ["--duration", "1", "--warmup", "0", "--rounds", "1", "--orders", "1000"]
WATCH = ["--scenarios", "watch", *SHORT, "--watchers", "10", "--updates-per-second", "10", "--watch-drain", "1"]
# Runs whose only scenario fails at once: the server rejects an argument, so little more than the baseline runs.
FAILING_GET = ["--scenarios", "get", *SHORT, "--baseline-once", "--server-args=--bogus"]


def _bench(args: Sequence[str], tmp_path: Path, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """``python -m bench args`` to its end, with its temp dirs under ``tmp_path``: exit status, stdout, stderr."""
    bench = _start(args, tmp_path)
    try:
        stdout, stderr = bench.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a regression that hangs: its group goes too
            os.killpg(bench.pid, signal.SIGKILL)
    return bench.returncode, stdout, stderr


def _start(args: Sequence[str], tmp_path: Path) -> subprocess.Popen[str]:
    """``python -m bench args`` in a process group of its own (as in a terminal), temp dirs under ``tmp_path``."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "400"},  # COLUMNS: --help on one line
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.database_free
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "nan"], "argument --duration: 'nan' is not a finite number"),
        (["--duration", "inf"], "argument --duration: 'inf' is not a finite number"),
        (["--warmup", "inf"], "argument --warmup: 'inf' is not a finite number"),
        (["--watch-drain", "inf"], "argument --watch-drain: 'inf' is not a finite number"),
        (["--updates-per-second", "0"], "--updates-per-second > 0"),
        (["--updates-per-second", "-10"], "--updates-per-second > 0"),
        (["--watchers", "0"], "--watchers and --watch-procs must be >= 1"),
        (["--watch-procs", "0"], "--watchers and --watch-procs must be >= 1"),
        (["--watch-procs", "-2"], "--watchers and --watch-procs must be >= 1"),
        (["--watch-drain", "-1"], "--watch-drain >= 0"),
        (["--scenarios", ","], "--scenarios names no scenario; choose from create, get"),
        (["--server-args=--log-level 'info"], '--server-args "--log-level \'info": No closing quotation'),
        (["--json", "{tmp}/missing/report.json"], "there is no directory {tmp}/missing: create it"),
        (["--json", "{tmp}"], "--json {tmp} is a directory: name a file"),
        (["--json", "/proc/self/report.json"], "/proc/self is not writable"),  # even for root
        (["--tmp-dir", "{tmp}/a-file"], "--tmp-dir {tmp}/a-file is a file, not a directory"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_anything_runs(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").touch()
    status, stdout, stderr = _bench([arg.format(tmp=tmp_path) for arg in args], tmp_path, timeout=20)
    assert status == 2, stderr
    assert message.format(tmp=tmp_path) in stderr
    assert "Traceback" not in stderr and "[bench]" not in stderr and stdout == ""


@pytest.mark.database_free
def test_the_server_args_help_says_to_join_a_dashed_value_with_an_equals_sign(tmp_path: Path) -> None:
    _, stdout, _ = _bench(["--help"], tmp_path, timeout=20)
    assert "e.g. --server-args='--log-level info' (with the =, since the value begins with a dash)" in stdout


@pytest.mark.database_free
def test_a_scenario_whose_server_exits_shows_the_servers_error_in_the_table(tmp_path: Path) -> None:
    status, stdout, stderr = _bench([*FAILING_GET, "--json", str(tmp_path / "report.json")], tmp_path)
    assert status == 1, stderr
    failed = next(line for line in stdout.splitlines() if line.startswith("get "))
    assert failed.startswith("get        FAILED: orders.server exited with status 2: ")
    assert failed.endswith("error: unrecognized arguments: --bogus")


@pytest.mark.database_free
def test_the_table_is_printed_before_the_report_is_written_and_a_write_failure_is_one_line(tmp_path: Path) -> None:
    status, stdout, stderr = _bench([*FAILING_GET, "--json", "/dev/full"], tmp_path)  # every write fails: ENOSPC
    assert status == 1
    assert "targets (issue 5):" in stdout
    assert "cannot write the report to /dev/full ([Errno 28] No space left on device)" in stderr
    assert "Traceback" not in stderr


def _command_line(pid: int) -> list[str]:
    """A process's arguments ([] if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def _wait_for(bench: subprocess.Popen[str], ready: Callable[[int], bool]) -> tuple[list[int], list[str]]:
    """Wait until one of the bench's descendants is ``ready``; the descendants then, and its command line."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and bench.poll() is None:
        descendants = process_tree(bench.pid)[1:]
        for pid in descendants:
            if ready(pid):
                return descendants, _command_line(pid)
        time.sleep(0.05)
    raise AssertionError(f"the bench never got there; it ended with {bench.returncode}")


def _running(module: str) -> Callable[[int], bool]:
    """Whether a process is ``python -m module`` (from its start, while it still imports)."""
    return lambda pid: module in _command_line(pid)


def _generating_load(pid: int) -> bool:
    """Whether a process is a pool process with an event loop (asyncio's self-pipe is a socket pair): the load
    generator, as the pool's warm-up runs none."""
    try:
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return "spawn_main" in " ".join(_command_line(pid)) and any(fd.startswith("socket:") for fd in fds)


def _alive(pids: Sequence[int], patience: float = 5.0) -> list[int]:
    """Those of ``pids`` still running after up to ``patience`` seconds (an orphan may stay a zombie here)."""
    deadline = time.monotonic() + patience
    while True:
        alive = [pid for pid in pids if _state(pid) not in ("", "Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process's state letter (R, S, Z, ...), or "" if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Processes a test found under a bench; any still running at its end (a regression) are killed."""
    pids: list[int] = []
    yield pids
    for pid in _alive(pids, patience=0):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """``tmp_path``, with an empty ``tmp`` in it for the bench's temp dirs."""
    (tmp_path / "tmp").mkdir()
    return tmp_path


def _stop_run(
    args: Sequence[str],
    ready: Callable[[int], bool],
    signum: int,
    to_group: bool,
    tmp_dir: Path,
    leftovers: list[int],
) -> tuple[str, list[str], float]:
    """Start ``python -m bench args``, send it ``signum`` (``to_group``: to its process group, as a terminal's
    Ctrl-C does) once one of its processes is ``ready``, and check that it exits 128 + ``signum`` without a
    traceback or a failure, leaving no process, temp dir or report; its stderr, the ready process's command
    line and the seconds the bench took to stop."""
    bench = _start([*args, "--json", str(tmp_dir / "report.json")], tmp_dir / "tmp")
    try:
        descendants, process = _wait_for(bench, ready)
        leftovers += descendants
        (os.killpg if to_group else os.kill)(bench.pid, signum)
        signalled = time.monotonic()
        _, stderr = bench.communicate(timeout=TIMEOUT)
    finally:
        bench.kill()
    assert bench.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and " failed: " not in stderr  # nor a server's, quoted in a failure
    assert _alive(leftovers) == [], "processes left behind"
    assert list((tmp_dir / "tmp").iterdir()) == [], "temporary files left behind"
    assert not (tmp_dir / "report.json").exists()
    return stderr, process, time.monotonic() - signalled


def test_sigterm_stops_the_run_and_leaves_no_process_file_or_database_behind(
    backend: str, tmp_dir: Path, leftovers: list[int]
) -> None:
    db_server = ["--db-server", os.environ[DATABASE_ENV]] if backend == "postgresql" else []
    args = [*WATCH, *db_server]
    stderr, server, _ = _stop_run(args, _running("orders.server"), signal.SIGTERM, False, tmp_dir, leftovers)
    assert "stopped by SIGTERM; no report written" in stderr
    if db_server:
        import psycopg

        with psycopg.connect(db_server[1]) as admin:
            names = {name for (name,) in admin.execute("SELECT datname FROM pg_database")}
        database = urllib.parse.urlsplit(server[server.index("--db") + 1]).path.lstrip("/")
        assert database not in names, "the temporary database is left"


@pytest.mark.database_free
@pytest.mark.parametrize(
    "ready",
    [_running("bench.baseline"), _generating_load],
    ids=["while-a-server-starts", "while-generator-processes-run"],
)
def test_ctrl_c_stops_the_run_at_once_with_130_and_no_traceback_from_any_process(
    ready: Callable[[int], bool], tmp_dir: Path, leftovers: list[int]
) -> None:
    # Two load-generator processes, whose window (10 s) the bench must not wait out.
    args = ["--scenarios", "get", "--procs", "2", "--duration", "10", "--warmup", "0", "--orders", "1000"]
    stderr, _, seconds = _stop_run(args, ready, signal.SIGINT, True, tmp_dir, leftovers)
    assert "interrupted (Ctrl-C); no report written" in stderr
    assert seconds < 5


@pytest.mark.database_free
def test_the_report_s_config_redacts_the_db_server_password(tmp_path: Path) -> None:
    url = "postgresql://postgres:s3cret@127.0.0.1:5432/test"
    args = run.parse_args(["--db-server", url, "--json", str(tmp_path / "report.json")])
    config = run.report_config(args)
    assert config["db_server"] == "postgresql://postgres:***@127.0.0.1:5432/test"
    assert "s3cret" not in json.dumps(config)


@pytest.mark.database_free
def test_a_fairness_that_cannot_be_told_is_null_and_the_report_is_strict_json(tmp_path: Path) -> None:
    nobody_finished = report.unary_report(LoadResult(window=1.0, per_caller=[0, 0]), None)
    assert nobody_finished["fairness"] is None
    report.write_json(tmp_path / "report.json", nobody_finished)
    json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)
    with pytest.raises(ValueError, match="not JSON compliant"):
        report.write_json(tmp_path / "other.json", {"fairness": math.nan})


@pytest.mark.database_free
def test_a_server_that_exits_before_the_bench_stops_it_is_noted(tmp_path: Path) -> None:
    gone = ServerProcess("bench.baseline", ["--port", "0"], tmp_path / "gone.log")
    stopped = ServerProcess("bench.baseline", ["--port", "0"], tmp_path / "stopped.log")
    for server in (gone, stopped):
        server.start()
    try:
        os.kill(gone.pid, signal.SIGTERM)  # as if it had ended by itself in the middle of the window
        assert gone.process is not None and gone.process.wait(TIMEOUT) == 0
    finally:
        gone.stop()
        stopped.stop()
    notes = [
        report.server_note("get", run._usage(ResourceSampler(server.pid), Used(), 1.0, server).as_dict())
        for server in (gone, stopped)
    ]
    assert notes == ["get: the server exited by itself with status 0 before the bench stopped it", None]
