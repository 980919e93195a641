"""The in-hub worker: a child process of `hub run` in the embedded default.

Layer: composition root (`hubapp`); imports the `hub` core and `tasks.worker`
(the worker's command line and environment), never the Celery app itself.

The child (`tasks.worker.worker_command`) gets the hub's validated settings in
its environment (`tasks.worker.worker_environment`) and its own session, and
dies with the hub even when the hub is SIGKILLed (Linux). `check_worker` runs
its configuration check before the hub serves; `WorkerChild` starts it,
restarts it when it dies (but not when its configuration is wrong: then it
reports the error, and the hub stops), and stops it warmly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hub.errors import EXIT_CONFIG, ConfigError, HubError
from hub.settings import Settings
from tasks.worker import worker_command, worker_environment

log = logging.getLogger(__name__)


class WorkerChild:
    """The in-hub worker process. `start()`, then `await stop()`.

    `on_config_error` is called (once) when the worker exits because its
    configuration is invalid; it is not restarted then.
    """

    def __init__(
        self,
        settings: Settings,
        data_path: Path,
        on_config_error: Callable[[ConfigError], None],
    ) -> None:
        self.settings = settings
        self.log_path = data_path / "worker.log"
        self._on_config_error = on_config_error
        self._process: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Start the worker and watch it (on the running loop)."""
        self._spawn()
        self._supervisor = asyncio.ensure_future(self._supervise())

    def _spawn(self) -> None:
        log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            worker_command(),
            env=worker_environment(self.settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl+C meant for the hub must not reach the
            # worker directly; the hub stops it in order after the listeners.
            start_new_session=True,
            preexec_fn=_DIE_WITH_PARENT,
        )
        log_file.close()

    async def _supervise(self) -> None:
        """Restart the in-hub worker if it dies; say so, with where its log is.

        A worker that exits with `EXIT_CONFIG` would fail the same way again:
        the hub stops instead, with the worker's one line as its error.
        """
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            worker = self._process
            if worker is None or worker.poll() is None:
                delay = 1.0
                continue
            if worker.returncode == EXIT_CONFIG:
                self._process = None
                self._on_config_error(
                    ConfigError(
                        _config_error_line(self.log_path)
                        or f"the task worker's configuration is invalid (log: {self.log_path})"
                    )
                )
                return
            log.error(
                "the task worker exited with status %s; restarting it (log: %s)",
                worker.returncode,
                self.log_path,
            )
            self._spawn()
            delay = min(delay * 2, 30.0)

    def stop_supervising(self) -> None:
        """No more restarts: the hub is stopping (the worker stops last, in `stop`)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None

    async def stop(self) -> None:
        """SIGTERM (a warm shutdown: the task in hand finishes), then, after
        `worker_stop_timeout_s`, SIGKILL; what it held returns to the queue."""
        self.stop_supervising()
        worker, self._process = self._process, None
        if worker is None or worker.poll() is not None:
            return
        worker.send_signal(signal.SIGTERM)
        timeout = self.settings.worker_stop_timeout_s
        try:
            status = await asyncio.to_thread(worker.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "the task worker did not stop within %.0f s (worker_stop_timeout_s / "
                "HUB_WORKER_STOP_TIMEOUT_S); killing it, its unfinished messages stay queued",
                timeout,
            )
            worker.kill()
            status = await asyncio.to_thread(worker.wait)
        log.info("task worker stopped (status %s)", status)


def check_worker(settings: Settings) -> None:
    """Run the worker's own configuration check; a ConfigError with its one line if it fails."""
    try:
        result = subprocess.run(
            worker_command("--check"),
            env=worker_environment(settings),
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        raise HubError("the task worker's configuration check did not finish") from None
    if result.returncode == 0:
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {result.returncode}"
    if result.returncode == EXIT_CONFIG:
        raise ConfigError(last.removeprefix("configuration error: "))
    raise HubError(f"the task worker cannot start: {last}")


def _config_error_line(log_path: Path) -> str | None:
    """The worker's last configuration error in its log, without the prefix."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(max(0, log_path.stat().st_size - 16384))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = [x for x in tail.splitlines() if x.startswith("configuration error: ")]
    return found[-1].removeprefix("configuration error: ") if found else None


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for the worker child that makes it get SIGTERM when the hub dies,
    even by SIGKILL (Linux `prctl(PR_SET_PDEATHSIG)`); None elsewhere.

    The worker then shuts down warmly and returns unfinished messages to the
    local queue, where the next hub's worker finds them. libc is loaded here,
    before any fork, so that the child only makes the one system call.
    """
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_signal


_DIE_WITH_PARENT = _parent_death_signal()
