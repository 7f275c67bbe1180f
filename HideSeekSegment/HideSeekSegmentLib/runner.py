"""Run the engine out of process and follow its JSON progress lines without blocking the caller.

A diffusion run takes minutes; inside Slicer it must neither freeze the GUI nor share its Python state with it
(a crash or an out-of-memory kill then takes only the worker down). The worker is ``python -m hideseek segment
... --progress json``: one JSON object per line on standard output, errors as one line on standard error
(docs/output-contract.md). Two reader threads drain both pipes so that the worker never blocks on a full pipe;
progress events are queued for ``poll()`` (a QTimer in the Slicer widget) and, optionally, passed to a callback
on the reader thread (scripts). The worker runs in its own process group, so that ``cancel()`` kills it and
everything it started.

Only the standard library is used here: the runner is tested without Slicer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

STDERR_LINES_KEPT = 200
"""The tail of standard error kept for the one-line error message (a traceback can be long)."""
READER_JOIN_SECONDS = 5.0
"""How long cancel waits for the output readers after the kill (a surviving grandchild could hold a pipe)."""
ERROR_PREFIX = "hideseek: error: "
"""How the CLI starts its one-line errors; the runner shows the message without it."""


class ProcessRunner:
    """One worker process: ``start()``, then ``poll()`` until ``running`` is False, or ``wait()``; ``cancel()``."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        onEvent: Callable[[dict], None] | None = None,
    ) -> None:
        self.command = [str(part) for part in command]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.onEvent = onEvent
        self.cancelled = False
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._log: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        """Launch the worker; raises OSError (e.g. the Python executable is missing) without leaving anything."""
        if self._process is not None:
            raise RuntimeError("this runner was already started; create a new one for another run")
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            **_processGroupOptions(),
        )
        self._readers = [
            threading.Thread(target=self._readStdout, name="hideseek-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="hideseek-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def running(self) -> bool:
        """True while the worker runs or its output is still being read."""
        if self._process is None:
            return False
        return self._process.poll() is None or any(reader.is_alive() for reader in self._readers)

    @property
    def returncode(self) -> int | None:
        """The worker's exit status once it has ended (negative: killed by that signal on POSIX)."""
        return None if self._process is None else self._process.poll()

    @property
    def succeeded(self) -> bool:
        """Ended on its own with status 0 and was not cancelled: only then are its outputs complete."""
        return not self.running and self.returncode == 0 and not self.cancelled

    def poll(self) -> list[dict]:
        """The progress events received since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the worker has ended and its output is read; returns the exit status.

        Raises ``subprocess.TimeoutExpired`` when ``timeout`` seconds pass first (the worker keeps running).
        """
        if self._process is None:
            raise RuntimeError("the runner was not started")
        status = self._process.wait(timeout)
        for reader in self._readers:
            reader.join()
        return status

    def cancel(self) -> None:
        """Kill the worker and every process it started; its outputs must not be used afterwards."""
        self.cancelled = True
        if self._process is None or self._process.poll() is not None:
            return
        _killProcessTree(self._process)
        self._process.wait()
        for reader in self._readers:  # the pipes close with the killed processes
            reader.join(READER_JOIN_SECONDS)

    @property
    def error(self) -> str | None:
        """One line that says why the run failed, or None when it did not fail (or was cancelled)."""
        if self.cancelled or self.running or self.returncode in (None, 0):
            return None
        lines = [line.strip() for line in self._stderr if line.strip()]
        flagged = [line for line in lines if line.startswith(ERROR_PREFIX)]
        if flagged:
            return flagged[-1][len(ERROR_PREFIX) :]
        if lines:
            return lines[-1]  # e.g. the exception line that ends a traceback
        return f"the worker exited with status {self.returncode} without an error message"

    @property
    def log(self) -> list[str]:
        """Standard output lines that were not progress events (warnings printed by libraries), latest last."""
        return list(self._log)

    def _readStdout(self) -> None:
        for line in self._process.stdout:
            event = _parseEvent(line)
            if event is None:
                self._log.append(line.rstrip("\n"))
                continue
            self._events.put(event)
            if self.onEvent is not None:
                self.onEvent(event)

    def _readStderr(self) -> None:
        for line in self._process.stderr:
            self._stderr.append(line.rstrip("\n"))


def _parseEvent(line: str) -> dict | None:
    """A progress event is a JSON object with a ``stage``; anything else on stdout is log text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None


def _processGroupOptions() -> dict:
    """Start the worker as the leader of its own process group (POSIX) or group with no console window
    (Windows), so that cancel can reach its children and Slicer's own process is never signalled."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _killProcessTree(process: subprocess.Popen) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    with contextlib.suppress(ProcessLookupError):  # it may end between the check and the kill
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session made the worker's pid its group id
