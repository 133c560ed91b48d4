"""Preemption: SIGTERM / SIGINT stop training at the next step boundary, after a checkpoint.

A scheduler preempting a job sends SIGTERM (Slurm, Kubernetes, Borg) and kills it a grace period
later; a user presses Ctrl-C (SIGINT). Either signal only sets a flag here: the training loop
finishes the step it is in, saves a checkpoint, waits for it to be committed and raises
`Preempted`, which `unimoe.main` turns into exit code `EXIT_CODE`. A second signal of the same
kind gets the previous handler (Python's KeyboardInterrupt for Ctrl-C, termination for SIGTERM),
so a user can still abort a save that hangs.
"""

from __future__ import annotations

import logging
import signal
import threading
import types

log = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"): the checkpoint is
# saved and re-running the same command resumes. Distinct from 0 (finished) and 1 (an error), so a
# job script can requeue on it: `python -m unimoe.main ...; [ $? -eq 75 ] && requeue`.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving the checkpoint of `step` of `stage`."""

    def __init__(self, stage: str, step: int, signal_name: str):
        self.stage, self.step, self.signal_name = stage, step, signal_name
        super().__init__(
            f"{signal_name}: stage {stage!r} saved its checkpoint at step {step} and stopped; "
            "run the same command again to resume"
        )


class PreemptionGuard:
    """Context manager: while active, SIGTERM / SIGINT set `requested` instead of killing.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread) the guard does nothing and signals keep their usual effect.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self.requested = signal.Signals(signum).name
        log.warning(
            'received %s: saving a checkpoint at the end of this step, then stopping '
            '(send it again to stop at once)',
            self.requested,
        )
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                # None: a handler installed outside Python, which cannot be put back; use the default.
                self._previous[signum] = signal.signal(signum, self._handle) or signal.SIG_DFL
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
