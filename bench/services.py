"""What the benchmarks start and measure: child processes, RabbitMQ vhosts, ports, queues.

Layer: benchmarks; may import anything.

Everything here is started on 127.0.0.1 only and is stopped by its owner in a
`finally` (or an `ExitStack`), so an interrupted benchmark leaves no process,
vhost or temporary folder behind. Child processes run in their own process
group so that a Ctrl+C in the terminal reaches only the benchmark, which then
stops them in order: the server first (the hub flushes to RabbitMQ), then the
worker, and the vhost last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"
RABBITMQ_PORT = 5672


class BenchError(Exception):
    """A benchmark could not run; the message says why and what to do."""


def log(message: str) -> None:
    """Progress output: one line on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ours without any HUB_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "firmware-sim"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2
) -> None:
    """Poll `predicate` until it holds; BenchError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------


def _child_setup() -> None:  # pragma: no cover - runs in the child after fork
    raise_fd_limit()


def process_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and all its descendants, live or reaped."""
    total = 0.0
    try:
        times = proc.cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


def process_rss(proc: psutil.Process, *, tree: bool = False) -> int:
    """Resident memory in bytes (of the process, or of it and its descendants)."""
    try:
        rss = int(proc.memory_info().rss)
        if tree:
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += int(child.memory_info().rss)
        return rss
    except psutil.Error:
        return 0


class Child:
    """A child process with its output in a log file (or stdout read line by line)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        read_stdout: bool = False,
        on_line: Callable[[str], None] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.lines: list[str] = []
        self._on_line = on_line
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if read_stdout else self._log,
            stderr=self._log,
            process_group=0,
            preexec_fn=_child_setup,  # runs before exec; only a setrlimit
        )
        self.ps = psutil.Process(self.process.pid)
        self._reader: threading.Thread | None = None
        if read_stdout:
            self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self._on_line is not None:
                try:
                    self._on_line(line)
                except Exception as exc:  # a display problem must not stop the reading
                    log(f"{self.name}: could not show a line: {exc}")

    def json_lines(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_s(self) -> float:
        return process_cpu_s(self.ps)

    def rss(self, *, tree: bool = False) -> int:
        return process_rss(self.ps, tree=tree)

    def log_text(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def wait_for_log(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Wait until the log matches `pattern` (a regex); the match."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            self.check_alive()
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"{self.name} did not start within {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end by itself; BenchError on timeout."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not finish within {timeout_s:g} s") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL (of the whole process group) after `timeout_s`."""
        try:
            if self.alive():
                self.signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not stop in {timeout_s:g} s; killing it")
            # Kill what is left of the group (e.g. pool children of a worker).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self._reader is not None:
                self._reader.join(5)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._log.close()


# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------


def _rabbitmqctl(*args: str, timeout_s: float = 60.0) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise BenchError(
            "rabbitmqctl is not on PATH; the benchmark makes its own RabbitMQ vhost with it "
            "(run as root or as a user allowed to use rabbitmqctl)"
        )
    try:
        result = subprocess.run(
            [ctl, "-q", *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"rabbitmqctl {args[0]} took longer than {timeout_s:g} s") from None
    if result.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class Vhost:
    """A fresh RabbitMQ vhost for one run (`with Vhost() as v: v.url`), deleted afterwards."""

    def __init__(self, label: str) -> None:
        if not port_open(LOCALHOST, RABBITMQ_PORT):
            raise BenchError(
                f"RabbitMQ is not reachable on {LOCALHOST}:{RABBITMQ_PORT} (guest/guest); "
                "start it with `rabbitmq-server -detached`"
            )
        self.name = f"bench-{label}-{uuid.uuid4().hex[:10]}"
        self.url = f"amqp://guest:guest@{LOCALHOST}:{RABBITMQ_PORT}/{self.name}"
        self._created = False

    def __enter__(self) -> Vhost:
        _rabbitmqctl("add_vhost", self.name)
        self._created = True
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._created:
            try:
                _rabbitmqctl("delete_vhost", self.name)
            except BenchError as error:
                log(f"could not delete vhost {self.name}: {error}")
            self._created = False


class QueueProbe:
    """Reads a queue's depth and consumer count (passive declare), without consuming."""

    def __init__(self, url: str) -> None:
        from kombu import Connection

        self._connection = Connection(url, connect_timeout=5)
        self._channel: Any = None

    def depth(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of `queue`, or None if it does not exist (yet)."""
        try:
            if self._channel is None:
                self._connection.ensure_connection(max_retries=3)
                self._channel = self._connection.channel()
            _, messages, consumers = self._channel.queue_declare(queue=queue, passive=True)
            return int(messages), int(consumers)
        except Exception:  # 404 closes the channel: open a new one next time
            self._close_channel()
            return None

    def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
        self._channel = None

    def close(self) -> None:
        self._close_channel()
        with contextlib.suppress(Exception):
            self._connection.release()


def rabbitmq_process(port: int = RABBITMQ_PORT) -> psutil.Process | None:
    """The RabbitMQ server process (beam.smp) listening on `port`, if this user can see it.

    Other Erlang nodes may run on the machine (private test or benchmark nodes),
    so the first beam.smp found is not necessarily the one the run uses.
    """
    nodes = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    for proc in nodes:
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for c in proc.net_connections(kind="tcp")
            ):
                return proc
    return nodes[0] if len(nodes) == 1 else None


# ---------------------------------------------------------------------------
# Cleanup on signals
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt, so `finally` blocks clean up.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    Only the first signal interrupts; later ones would break off the cleanup itself.
    """
    interrupted = False

    def handler(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            log("still stopping what was started; please wait")
            return
        interrupted = True
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
