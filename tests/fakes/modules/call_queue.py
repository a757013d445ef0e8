"""modules.call_queue: the generation lock. Real WebUI: a plain non-reentrant lock (v1.10.1) or a FIFO lock (dev);
re-entering it deadlocks. The fake raises instead of hanging, so a test fails where the WebUI would freeze."""

import threading


class NonReentrantLock:
    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.acquisitions = 0

    def acquire(self, blocking=True, timeout=-1):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock acquired twice by one thread: the real WebUI would deadlock here")
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
            self.acquisitions += 1
        return got

    def release(self):
        self.owner = None
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


queue_lock = NonReentrantLock()


def wrap_gradio_gpu_call(func, extra_outputs=None):
    from modules import shared

    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job="wrapped")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return f
