"""Where a model trains and evaluates: the CPU, or a CUDA GPU the process was given.

``auto`` (the default) takes the first visible CUDA device, else the CPU. Flower's simulation
engine runs each client in a Ray actor; Ray makes a GPU visible only to an actor given one
(``client-resources-num-gpus`` in the federation config) and hides every GPU from the others,
so ``auto`` means "a GPU if this client was given one". A deployed client sees its machine's
GPUs; its holder can pin ``device = "cpu"`` (or ``"cuda:1"``) in the node config.
"""

from __future__ import annotations

import re

import torch
from torch.utils.data import TensorDataset

DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"


class DeviceError(ValueError):
    """The requested device does not exist here; the message says what does."""


def pick_device(preference: str = "auto") -> torch.device:
    """The device for ``preference`` (``auto``, ``cpu``, ``cuda``, ``cuda:<i>``)."""
    name = preference.strip().lower() or "auto"
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise DeviceError(f"device {preference!r}: use {DEVICE_CHOICES}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= visible:
        raise DeviceError(
            f"device {preference!r}: this process sees {visible} CUDA device(s); use "
            "device = \"auto\" or \"cpu\", or give the client a GPU"
        )
    return torch.device("cuda", index)


def to_device(data: TensorDataset, device: torch.device) -> TensorDataset:
    """``data`` on ``device``: copied once there (every batch is then a gather on the
    device), or ``data`` itself when it is there already."""
    if all(t.device == device for t in data.tensors):
        return data
    return TensorDataset(*(t.to(device) for t in data.tensors))
