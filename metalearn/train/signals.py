"""Stop signals while training: the loop saves last.pt at the next iteration boundary."""

from __future__ import annotations

import contextlib
import signal
import threading

# What SLURM pre-emption (SIGTERM, or submitit's SIGUSR2 before the time limit) and Ctrl-C
# (SIGINT) send: the loop saves last.pt at the next iteration boundary, then the signal takes
# its usual course (exit, KeyboardInterrupt, or the launcher's own handler, which may requeue).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR2") if hasattr(signal, name)
)


class StopRequest:
    """The stop signal received while training, if any (set by the handler, read by the loop)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Catch STOP_SIGNALS while the loop runs (the loop checks the request at each iteration
    boundary); restore the previous handlers afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be set in the main thread
        return
    previous = {signum: signal.signal(signum, request.handler) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
