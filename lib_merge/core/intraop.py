"""Torch's own threads inside the merge's worker threads.

The engine already runs one worker per core, each merging its own keys. If every worker's torch ops also split
across torch's intra-op threads, the cores are oversubscribed: two workers × two OpenMP teams on two cores, whose
threads spin while they wait for each other. Measured on the 2-core CI-class machine, a full SD1.5 Weight sum took
1.6–1.9 CPU-s with one torch thread per worker against 2.0–2.9 with torch's default; a 512K-element fp16 lerp ran
4x slower with two intra-op threads than with one while another process used the cores.

`torch.set_num_threads` sets the calling thread's OpenMP count, which is what we want, but it also stores the count
new threads start from, process-wide: a WebUI thread started during a merge would then run its ops on one core.
So each worker sets its own count (the default shared out: one each on two cores) and the process default is put
back at once, from a short-lived thread.
"""

from __future__ import annotations

import threading

import torch


def _run_in_new_thread(call, *args):
    box = []
    thread = threading.Thread(target=lambda: box.append(call(*args)), name="merge-threads")
    thread.start()
    thread.join()
    return box[0] if box else None


def new_thread_default() -> int:
    """How many intra-op threads a thread that has not chosen gets (what a new thread starts with)."""
    return _run_in_new_thread(torch.get_num_threads)


def worker_share(workers: int) -> tuple[int, int]:
    """(each of `workers` worker threads' torch thread count, the process default): the default split between
    them, at least one each, so that the workers together use what one thread would have used."""
    default = new_thread_default()
    return max(1, default // workers), default


def use_threads_here(count: int, default: int) -> None:
    """Give this thread's torch ops `count` threads, leaving every other thread's count and the process default
    (`default`, from `worker_share`) as they are."""
    torch.get_num_threads()  # torch sets a thread's count lazily on its first op, from the process default: now
    torch.set_num_threads(count)
    _run_in_new_thread(torch.set_num_threads, default)  # the process default back; that thread's own count is moot
