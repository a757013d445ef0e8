"""modules.timer.Timer: only what the loading code touches."""


class Timer:
    def __init__(self, *args, **kwargs):
        self.records = []

    def record(self, category, extra_time=0, disable_log=False):
        self.records.append(category)

    def summary(self):
        return ", ".join(self.records)
