"""A rank of a tensor-parallel group that dies or stalls ends the run with a clear error, never a hang.

A rank that dies: its OS closes its sockets.  MLX's ring backend fails a collective in flight with
RuntimeError("[ring] connection to a peer was lost"), which `peer_lost` recognises (one line, exit 1);
a collective issued later hangs, which `liveness` prevents (its own sockets: every rank exits at once).

A rank that stalls without closing its sockets (a frozen process, a host gone from the network without a
reset) leaves the others waiting in a collective: MLX has no timeout.  `Watchdog` is a thread that ends its
process (one line, status 1) once a step has made no progress for `timeout` seconds; `mx.eval` lets other
threads run while it waits in a collective, so the thread gets to run.  Steps call `beat()` (a prefill
chunk or a generated token); waiting for the user's input is no stall (`paused`).
"""

import contextlib
import os
import sys
import threading
import time

from . import liveness

DEFAULT_TIMEOUT = 300.0  # seconds one step (a prefill chunk or a token) may take on a group
_LOST = ("connection to a peer was lost", "[ring]", "[jaccl]", "[mpi]", "[nccl]")


def peer_lost(e: BaseException) -> bool:
    """True for the error a collective raises when another rank of the group has gone."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _LOST)


def lost_message(prog: str, where: str, e: BaseException) -> str:
    return (
        f"{prog}{where}: lost the connection to another process of the group ({e}): a rank exited or was "
        "killed, or its host went away; every rank stops"
    )


def run_command(prog: str, where: str, body, errors=(OSError, ValueError, NotImplementedError)) -> int:
    """body() as a command's main: 0; 130 after Ctrl-C; 1 with one line `prog (rank r of N): why` on
    stderr for `errors` and for a lost peer (other exceptions propagate)."""
    try:
        body()
        liveness.finish()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except errors as e:
        print(f"{prog}{where}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        print(lost_message(prog, where, e), file=sys.stderr)
        return 1
    return 0


class Watchdog:
    """Exit the process with one line on stderr when no `beat()` came for `timeout` seconds while armed."""

    def __init__(self, timeout: float, prog: str, where: str = ""):
        self.timeout, self.prog, self.where = timeout, prog, where
        self._last = time.monotonic()
        self._armed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def beat(self, *_):
        """Progress was made (any arguments are ignored: usable as a progress callback)."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def armed(self):
        """Inside: a step that makes no progress for `timeout` seconds ends the process."""
        with self._lock:
            self._armed += 1
            self.beat()
            if self._thread is None and self.timeout > 0:
                self._thread = threading.Thread(target=self._watch, name="tq-watchdog", daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            with self._lock:
                self._armed -= 1

    @contextlib.contextmanager
    def paused(self):
        """Inside (waiting for input): no deadline."""
        with self._lock:
            armed, self._armed = self._armed, 0
        try:
            yield
        finally:
            with self._lock:
                self._armed = armed
                self.beat()

    def close(self):
        self._stop.set()

    def _watch(self):
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            if self._armed and time.monotonic() - self._last > self.timeout:
                self._fire()

    def _fire(self):
        msg = (
            f"{self.prog}{self.where}: no progress for {self.timeout:g} s in a step shared with the other "
            "processes of the group (a rank stalled, or the network between them stopped); exiting. "
            "--dist-timeout sets this limit."
        )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(msg, file=sys.__stderr__, flush=True)
        os._exit(1)
