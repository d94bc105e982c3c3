"""Worker process pools that leave Ctrl-C to the main process.

A terminal's Ctrl-C sends SIGINT to every process of its group. Workers that took it would each print
a KeyboardInterrupt traceback (or die mid-item) while the main process is already cleaning up, so
workers ignore it and the main process, which handles it, shuts them down. While the pool's
processes are created, the main process only notes a SIGINT (forked children inherit that harmless
handler until they ignore it) and raises KeyboardInterrupt once they exist; a forkserver starts with
SIGINT ignored, so it and every child it forks ignore it from their first instruction (a Ctrl-C in
those few milliseconds, once per process, is dropped). Torch-free: the LIDC placement workers import
only numpy and scipy.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable


def _init(initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, method: str, initializer: Callable | None = None,
                initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes (start ``method``), every one started before this returns."""
    ctx = multiprocessing.get_context(method)
    main = threading.current_thread() is threading.main_thread()  # only it may change signal handlers
    held: list[int] = []

    def note(signum, frame) -> None:
        held.append(signum)

    old = signal.signal(signal.SIGINT, note) if main else None
    pool = None
    try:
        try:
            if method == "forkserver" and main:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the server and all it forks
                multiprocessing.forkserver.ensure_running()
                signal.signal(signal.SIGINT, note)
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(initializer, initargs))
            # tasks that overlap in time: the pool creates a process for each, now
            started = [pool.submit(time.sleep, 0.05) for _ in range(workers)]
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        if held:
            raise KeyboardInterrupt
        for f in started:  # their imports and initializers run with Ctrl-C the main process's again
            f.result()
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool
