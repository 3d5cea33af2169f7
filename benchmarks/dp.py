"""Local training throughput: plain SGD against the project's DP-SGD path (Opacus, Poisson
sampling), one torch thread, on LeNet-5 (28×28 tensors) and the hashed-TF text models."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import peak_rss_mb, save, table
from client.training import DPSettings, train_local
from common.models import build_model


def samples_per_second(model_name: str, data: TensorDataset, batch: int, mode: str | None,
                       classes: int) -> float:  # fmt: skip
    model = build_model(model_name, classes, num_features=data.tensors[0].shape[-1])
    dp = None if mode is None else DPSettings(1.0, 1.0, "rdp", mode)
    train_local(model, data, epochs=1, batch_size=batch, learning_rate=0.1, dp=dp)  # warm-up
    started = time.perf_counter()
    train_local(model, data, epochs=1, batch_size=batch, learning_rate=0.1, dp=dp)
    return len(data) / (time.perf_counter() - started)


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 2048 if quick else 6000
    images = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    texts = TensorDataset(torch.rand(n, 4096), torch.randint(0, 4, (n,)))
    result: dict[str, Any] = {"examples": n, "threads": 1}
    rows = []
    for name, model, data, classes, batches in (
        ("lenet5", "lenet5", images, 10, (32, 64, 128, 256)),
        ("text-linear", "text-linear", texts, 4, (64,)),
        ("text-mlp", "text-mlp", texts, 4, (64,)),
    ):
        for batch in batches:
            plain = samples_per_second(model, data, batch, None, classes)
            entry = {"plain": plain}
            for mode in ("hooks", "ghost"):
                entry[mode] = samples_per_second(model, data, batch, mode, classes)
                entry[f"{mode}_vs_plain"] = entry[mode] / plain
            result[f"{name}@{batch}"] = entry
            rows.append((f"{name} batch {batch}",
                         f"plain {plain:6.0f}/s  hooks {entry['hooks']:6.0f}/s "
                         f"({entry['hooks_vs_plain']:.2f}x)  ghost {entry['ghost']:6.0f}/s "
                         f"({entry['ghost_vs_plain']:.2f}x)"))  # fmt: skip
    result["peak_rss_mb"] = peak_rss_mb()
    print("dp: local training throughput, samples/s (1 torch thread)")
    table([*rows, ("peak RSS", f"{result['peak_rss_mb']:.0f} MB")])
    save("dp", result)
    return result
