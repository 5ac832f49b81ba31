"""Signals during a conversion (docs/reliability.md, "Signals").

SIGINT, SIGTERM and SIGHUP are only recorded by the handler: no exception is raised inside
torch, jax, Orbax or a finalizer (where a KeyboardInterrupt can be swallowed, or leave native
state half-updated and crash the interpreter at exit). The converter calls `check()` at its safe
points, between steps and between tensors, which raises `Interrupted`; the temporary directory
is then removed on the way out and the exit status is 128 + the signal number (a hub download,
plain Python with no safe points, is interrupted at once: `interruptible`). A second signal
stops at once: the temporary directory and the lock file are removed and the process exits
with `os._exit`, except during the final renames, which are a few system calls and finish
first. A signal that was ignored when the converter started (`nohup`, a background job's
SIGINT) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))

# For tests: with LMJ_CONVERT_PAUSE=PHASE the converter stops at that phase, prints "paused at
# PHASE" and waits (up to a minute) for a signal, then carries on into the phase's work with the
# signal pending; with PHASE:hold it waits the whole minute (so that a second signal arrives
# while it waits).
PAUSE_ENV = "LMJ_CONVERT_PAUSE"


class Interrupted(BaseException):
    """A recorded signal, raised at a safe point (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # async-signal-safe: no buffered stream
        os.write(2, text.encode())


class SignalGuard:
    """Records SIGINT / SIGTERM / SIGHUP while active (main thread only; elsewhere the default
    handlers stay and KeyboardInterrupt is what arrives)."""

    def __init__(self):
        self.signum: int | None = None
        self.committed = False
        self._raise_now = False
        self._committing = False
        self._remove: list[Path] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.getsignal(sig)
                if previous == signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            if self._raise_now:
                raise Interrupted(signum)  # recorded first: if swallowed, check() still acts
            _say(f"\n{name}: stopping at the next safe point and removing the partial output "
                 "(send it again to stop at once)\n")
            return
        if self._committing:
            return  # the renames finish first; the next safe point reports the signal
        for path in self._remove:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        _say(f"{name} again: stopped; output not written\n")
        os._exit(128 + self.signum)

    def remove_on_abort(self, *paths: Path) -> None:
        """Paths a second signal removes before exiting (the temporary directory, the lock)."""
        self._remove.extend(Path(p) for p in paths)

    def check(self) -> None:
        """A safe point: raises `Interrupted` if a signal arrived."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def phase(self, name: str) -> None:
        """A safe point at the start of a named phase (see PAUSE_ENV)."""
        self.check()
        pause, _, hold = os.environ.get(PAUSE_ENV, "").partition(":")
        if pause == name:
            print(f"paused at {name}", flush=True)
            deadline = time.monotonic() + 60.0
            while (self.signum is None or hold) and time.monotonic() < deadline:
                time.sleep(0.005)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Around plain-Python work with no safe points of its own that writes nothing of ours
        (a hub download): a signal raises `Interrupted` at once."""
        self.check()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """Around the final renames: a second signal waits for them."""
        self._committing = True
        try:
            self.phase("commit")
            yield
            self.committed = True
        finally:
            self._committing = False
