"""SIGTERM/SIGUSR1 outside the training loop: stop now, and let the run directory say `interrupted`.

Inside the loop PreemptionCallback turns the signal into "checkpoint at the next step and stop". Before it (model
loading, tokenization) and after it (the evaluations that follow training) there is no step to wait for: the
signal raises `Interrupted` (a KeyboardInterrupt, so that `except Exception` blocks do not swallow it) and the
trainer records the state. A preempted `lexfine train` exits with errors.EXIT_INTERRUPTED (75).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class StopOnSignal:
    """While `armed`, SIGTERM/SIGUSR1 raise Interrupted in the main thread; disarmed (during the training loop,
    where PreemptionCallback chains to this handler) they do nothing here."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.armed = True
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.armed:
            self.armed = False  # a second signal while unwinding must not interrupt the bookkeeping
            raise Interrupted(signum)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
