"""The one signal policy of every zoflat command (README, "Errors and failures").

SIGINT (Ctrl-C), SIGTERM (kill, a scheduler, `timeout`), SIGHUP (a closed terminal, a lost ssh
session) and SIGQUIT (Ctrl-\\) all mean "stop gracefully":
  - while a run is being trained (`GracefulStop`), the first one asks it to stop after the current
    step, or at once if the step is being evaluated (a long test evaluation or Hessian trace looks
    at `stop_requested()` between micro-batches and raises StopRequested: that evaluation is
    discarded and the run resumes before it); it saves what resuming needs, marks its runs
    `interrupted`, prints the resume command and exits 130. A second one stops it at once (still
    marked interrupted, exit 130);
  - anywhere else (start-up, a refusal being printed, the sweep driver), it raises
    KeyboardInterrupt, which the CLI's error boundary turns into one line and exit 130;
  - once the process is on its way out (`ignore()`), further ones are acknowledged and ignored,
    so no signal ends in a traceback, also at exit.
Only the main thread installs handlers (signal.signal's own rule); elsewhere this is a no-op.
"""

import contextlib
import signal
import sys
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, name))
EXIT_INTERRUPTED = 130
_IN_FORCE = []  # the GracefulStop of the run being trained


class StopRequested(Exception):
    """Raised inside an evaluation once a stop was requested: the evaluation is discarded."""


def stop_requested() -> bool:
    """Whether a stop signal has asked the run being trained to stop."""
    return any(stop.requested for stop in _IN_FORCE)


def _tell(text: str):
    with contextlib.suppress(Exception):  # a closed terminal (SIGHUP) or a full pipe: nothing to tell
        print(text, file=sys.stderr, flush=True)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum, frame):
    ignore()  # one KeyboardInterrupt per process: later signals only get an acknowledgement
    raise KeyboardInterrupt


def _acknowledge(signum, frame):
    _tell(f"zoflat: {signal.Signals(signum).name} received; already stopping")


def _set(handler) -> dict:
    """handler for every stop signal; returns the previous ones (empty off the main thread)."""
    if not _main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def install() -> dict:
    """Every stop signal raises KeyboardInterrupt (once). The entry point calls this first of all."""
    return _set(_raise)


def ignore():
    """From now on stop signals are acknowledged and ignored (the process is ending)."""
    _set(_acknowledge)


def restore(previous: dict):
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class GracefulStop:
    """While a run trains: the first stop signal sets `requested` (the runner stops after the current
    step); a second raises KeyboardInterrupt (stop at once); more are acknowledged."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            _raise(signum, frame)
        self.requested = True
        _tell(f"zoflat: {signal.Signals(signum).name} received; stopping after this step, or now if it is being "
              f"evaluated (send it again to stop at once)")

    def __enter__(self):
        self._previous = _set(self._handle)
        _IN_FORCE.append(self)
        return self

    def __exit__(self, *exc):
        _IN_FORCE.remove(self)
        restore(self._previous)
        return False


@contextlib.contextmanager
def stopping_at_once():
    """For a command without steps to finish (the sweep driver, a table): every stop signal raises
    KeyboardInterrupt (once), also in a process that started with SIGINT ignored (a background job)."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)
