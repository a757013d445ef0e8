"""modules.lowvram: never needed on the fake's CPU, but calls are recorded."""

calls = []


def is_needed(sd_model):
    return False


def send_everything_to_cpu():
    calls.append("send_everything_to_cpu")
