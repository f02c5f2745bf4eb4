"""webui modules/devices.py: the compute device and dtypes (CPU, fp32 here, as with --use-cpu all --no-half)."""
import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_unet = torch.float32
dtype_vae = torch.float32
unet_needs_upcast = False


def torch_gc():
    pass


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()
