"""modules_forge.main_thread: Forge runs generations on one worker thread; the fake runs them at once and counts."""

calls = []


def run_and_wait_result(func, *args, **kwargs):
    calls.append(getattr(func, "__name__", str(func)))
    return func(*args, **kwargs)
