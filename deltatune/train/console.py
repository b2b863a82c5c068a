"""Console output that never kills a run: writes to a closed or broken stdout/stderr are dropped.

Under ``deltatune train ... 2>&1 | tee log``, Ctrl-C reaches ``tee`` too; it exits, and the next
progress-bar update or log line raises ``BrokenPipeError`` in the middle of training, before the
checkpoint the signal asked for. ``guarded_console()`` swaps ``sys.stdout``/``sys.stderr`` for
``SafeStream``s for the duration of a command: the first failed write points the stream's file
descriptor at ``/dev/null`` (so the interpreter's own flush at exit cannot fail either, as the Python
docs advise for ``BrokenPipeError``) and every later write is dropped. SIGPIPE is ignored meanwhile, so a
broken pipe is an error to drop rather than a signal that ends the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Optional

__all__ = ["SafeStream", "guarded_console", "safe_print", "StopSignals"]


class SafeStream:
    """A text stream that drops writes once its target is closed or its pipe's reader has gone."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = stream is None

    def _failed(self) -> None:
        self.broken = True
        try:  # the interpreter flushes sys.__stdout__ / __stderr__ at exit: give them somewhere to go
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        """Write ``text``; returns its length whether or not it could be written."""
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EIO; ValueError: I/O on a closed file
                self._failed()
        return len(text)

    def flush(self) -> None:
        """Flush the target, if it is still there."""
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._failed()

    def isatty(self) -> bool:
        """Whether the target is a terminal (False once broken)."""
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        """The target's file descriptor (tqdm asks it for the terminal width)."""
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        """The target's encoding."""
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def closed(self) -> bool:
        """Never: writes to a gone target are dropped instead of raising."""
        return False

    def writable(self) -> bool:
        """Always: see ``closed``."""
        return True


def safe_print(*values, file=None, **kw) -> None:
    """``print`` that ignores a closed or broken target (for messages from signal handlers)."""
    try:
        print(*values, file=file if file is not None else sys.stdout, **kw)
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def guarded_console():
    """Within the block, ``sys.stdout`` and ``sys.stderr`` are ``SafeStream``s and SIGPIPE is ignored."""
    old_out, old_err = sys.stdout, sys.stderr
    old_pipe = None
    try:
        old_pipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    except (ValueError, AttributeError, OSError):  # not the main thread, or no SIGPIPE (Windows)
        pass
    sys.stdout = old_out if isinstance(old_out, SafeStream) else SafeStream(old_out)
    sys.stderr = old_err if isinstance(old_err, SafeStream) else SafeStream(old_err)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = old_out, old_err
        if old_pipe is not None:
            signal.signal(signal.SIGPIPE, old_pipe)


class StopSignals:
    """Turn SIGTERM/SIGINT into a request to save and stop at the end of the current step."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.received = signum
        # Under `... | tee log` the pipe's reader got the signal too and is gone: the message may go nowhere.
        safe_print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                   f"(send again to stop without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
