"""modules.devices: a CPU box with the WebUI's default half precision."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float16
dtype_vae = torch.float16
dtype_unet = torch.float16
dtype_inference = torch.float16
fp8 = False
gc_calls = 0


def torch_gc():
    global gc_calls
    gc_calls += 1


def autocast(disable=False):
    return contextlib.nullcontext()


def get_optimal_device_name():
    return "cpu"
