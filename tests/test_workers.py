"""Worker pools leave Ctrl-C to the main process: workers ignore SIGINT from their first instruction,
and a Ctrl-C that arrives while the pool is being created is held and raised after, not lost."""
from __future__ import annotations

import os
import signal
from concurrent.futures import ProcessPoolExecutor

import pytest

from nodulesynth.workers import worker_pool


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_ignore_sigint_and_all_start(method):
    pool = worker_pool(2, method)
    try:
        assert len(pool._processes) == 2
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    finally:
        pool.shutdown()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process's is restored


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_ctrl_c_while_creating_the_pool_is_raised_after(monkeypatch, method):
    real = ProcessPoolExecutor.submit
    sent = []

    def submit(self, fn, *a, **k):
        if not sent:  # inside the window: SIGINT to this process, as a terminal's Ctrl-C would
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(self, fn, *a, **k)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    with pytest.raises(KeyboardInterrupt):
        worker_pool(2, method)
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
