"""The signal guard: the first SIGTERM / SIGINT is a request, the second one acts at once."""

import os
import signal
import threading
import time

import pytest

from unimoe.train import preemption


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread


@pytest.mark.parametrize('signum', preemption.SIGNALS)
def test_the_first_signal_is_recorded_the_second_gets_the_previous_handler(signum):
    received = []
    previous = signal.signal(signum, lambda s, f: received.append(s))
    try:
        with preemption.PreemptionGuard() as guard:
            _deliver(signum)
            assert guard.requested == signal.Signals(signum).name and not received
            _deliver(signum)
            assert received == [signum]
        _deliver(signum)  # the guard put the previous handler back
        assert received == [signum, signum]
    finally:
        signal.signal(signum, previous)


def test_outside_the_main_thread_the_guard_installs_nothing():
    handlers = []

    def enter_guard():
        with preemption.PreemptionGuard():
            handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter_guard)
    thread.start()
    thread.join()
    assert handlers == [signal.getsignal(signal.SIGTERM)]


def test_preempted_says_how_to_resume():
    error = preemption.Preempted('s3_moe', 120, 'SIGTERM')
    assert str(error) == (
        "SIGTERM: stage 's3_moe' saved its checkpoint at step 120 and stopped; run the same "
        'command again to resume'
    )
    assert preemption.EXIT_CODE == 75
