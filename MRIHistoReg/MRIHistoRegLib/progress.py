"""Progress reporting and cancellation shared by all long-running steps.

Long functions take `progress=None`: a callable `progress(fraction, message) -> None`. A callback cancels
the work by raising `Cancelled` (or returning True); the work then cleans up whatever it started (no
half-written files) and re-raises `Cancelled`.
"""
import sys
import time


class Cancelled(Exception):
    """Raised when the user cancels a long operation (the operation leaves nothing half-done)."""


def report(progress, fraction, message=""):
    """Call the progress callback (if any); a True return value means 'cancel'."""
    if progress is None:
        return
    if progress(min(max(float(fraction), 0.0), 1.0), message):
        raise Cancelled(message or "cancelled")


def scaled(progress, start, stop):
    """A callback mapping [0, 1] of a sub-step onto [start, stop] of the parent's progress."""
    if progress is None:
        return None
    return lambda fraction, message="": progress(start + (stop - start) * fraction, message)


class TerminalProgress:
    """A one-line progress bar on a terminal (silent when stderr is not a terminal, except start/end)."""

    def __init__(self, label, stream=None, width=30):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._last = -1.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, fraction, message=""):
        if not self._tty:
            return False
        if fraction - self._last < 0.005 and fraction < 1.0:
            return False
        self._last = fraction
        filled = int(round(self.width * fraction))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}% {elapsed:6.1f}s {message[:40]:<40}")
        if fraction >= 1.0:
            self.stream.write("\n")
        self.stream.flush()
        return False
