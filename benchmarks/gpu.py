"""GPU clients: LeNet-5 training throughput on a CUDA GPU against the CPU, plain SGD and the
project's DP-SGD path (bookkeeping clipping, Opacus's noise and accountant), at batch sizes
256-4096, in one short run (under 5 minutes on one GPU).

Each measurement trains ``client.training.train_local`` -- the ClientApp's own code, with
the data copied to the device once -- for one epoch of ``STEPS`` steps (q = 1/STEPS) on
MNIST-shaped tensors, after a warm-up epoch; samples/s is the best of ``REPEATS`` epochs.
The CPU uses all its cores (torch's default threads). Without a visible CUDA device the suite
prints why and measures nothing.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import save, table
from client.training import DPSettings, train_local
from common.models import LeNet5

BATCHES = (256, 1024, 4096)
STEPS = 8
REPEATS = 2


def samples_per_second(data: TensorDataset, batch: int, dp: bool, device: torch.device,
                       repeats: int = REPEATS) -> float:  # fmt: skip
    steps = len(data) // batch
    settings = DPSettings(1.0, 1.0, 1 / steps, steps, "rdp", "bookkeeping") if dp else None
    data = TensorDataset(*(t.to(device) for t in data.tensors))  # once, as the client does

    def epoch() -> float:
        model = LeNet5(10)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_local(model, data, epochs=1, batch_size=batch, learning_rate=0.1, dp=settings,
                    device=device)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(data) / (time.perf_counter() - started)

    epoch()  # warm-up: kernels, allocator, Opacus
    return max(epoch() for _ in range(repeats))


def run(quick: bool = False) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("gpu: skipped: no CUDA device visible (torch.cuda.is_available() is False)")
        return {"skipped": "no CUDA device visible"}
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook warnings
    torch.manual_seed(0)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "steps_per_epoch": STEPS,
    }
    rows = []
    for batch in BATCHES[:2] if quick else BATCHES:
        n = batch * STEPS
        data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
        entry = {
            f"{kind}_{where}": samples_per_second(data, batch, kind == "dp", device)
            for kind in ("plain", "dp")
            for where, device in (("gpu", gpu), ("cpu", cpu))
        }
        entry["dp_gpu_vs_cpu"] = entry["dp_gpu"] / entry["dp_cpu"]
        entry["dp_vs_plain_gpu"] = entry["dp_gpu"] / entry["plain_gpu"]
        result[f"lenet5@{batch}"] = entry
        rows.append((
            f"lenet5 batch {batch:4d}",
            f"DP-SGD gpu {entry['dp_gpu']:8.0f}/s cpu {entry['dp_cpu']:7.0f}/s "
            f"({entry['dp_gpu_vs_cpu']:.1f}x); plain gpu {entry['plain_gpu']:8.0f}/s "
            f"cpu {entry['plain_cpu']:7.0f}/s",
        ))  # fmt: skip
    result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"gpu: LeNet-5 samples/s on {result['gpu']} vs the CPU "
          f"({result['cpu_threads']} threads)")  # fmt: skip
    table([*rows, ("peak GPU memory", f"{result['peak_gpu_memory_mb']:.0f} MB")])
    save("gpu", result)
    return result
