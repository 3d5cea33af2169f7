"""Local training throughput: plain SGD against the project's DP-SGD path (Opacus, Poisson
sampling) on LeNet-5 (28×28 tensors) and the hashed-TF text models.

Every per-sample-gradient engine that can serve LeNet-5 is measured at the batch sizes
around the scenarios' one, at 1 torch thread (what each simulation actor uses,
``torch-threads = 1``) and at 2 threads, so the choice of ``grad-sample-mode`` and of
threads per actor rests on numbers from this machine:

- ``bookkeeping`` (the default): per-sample norms and the clipped sum from one backward
  pass (client/clipping.py), channels-last convolutions;
- ``hooks``: per-sample gradients materialised (B × params), one backward pass;
- ``ghost``: Opacus's ghost clipping: per-sample norms without materialising the linear
  layers' per-sample gradients, then a second backward pass on the reweighted loss;
- ``ew``: torch's ExpandedWeights (per-sample gradients inside autograd).

Opacus's own modes run in the default NCHW layout: its conv per-sample gradients are
wrong on channels-last activations (client/training.py).

Each measurement is the best of ``REPEATS`` epochs over 6,000 examples (one client's
MNIST share in mnist-iid-dp) on a fresh model after a warm-up epoch. Ratios are DP
samples/s over plain samples/s measured in the same process, one after the other.
"""

from __future__ import annotations

import time
import tomllib
import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import REPO, peak_rss_mb, save, table
from client.training import DPSettings, train_local
from common.config import RunConfig
from common.models import build_model
from common.privacy.accounting import steps_per_epoch

MODES = ("bookkeeping", "ghost", "hooks", "ew")
REPEATS = 2


def scenario_batch(scenario: str = "mnist-iid-dp") -> int:
    """The batch size the shipped scenario trains with."""
    path = REPO / "simulations" / f"{scenario}.toml"
    return int(tomllib.loads(path.read_text())["run-config"]["batch-size"])


def samples_per_second(model_name: str, data: TensorDataset, batch: int, mode: str | None,
                       classes: int, repeats: int = REPEATS) -> float:  # fmt: skip
    """Best training throughput over ``repeats`` epochs (a fresh model each: Opacus wraps it)."""
    k = steps_per_epoch(len(data), batch)
    dp = None if mode is None else DPSettings(1.0, 1.0, 1 / k, k, "rdp", mode)
    features = data.tensors[0].shape[-1]

    def epoch() -> float:
        model = build_model(model_name, classes, num_features=features)
        started = time.perf_counter()
        train_local(model, data, epochs=1, batch_size=batch, learning_rate=0.1, dp=dp)
        return len(data) / (time.perf_counter() - started)

    epoch()  # warm-up: allocator, kernels, Opacus imports
    return max(epoch() for _ in range(repeats))


def measure(model: str, data: TensorDataset, classes: int, batch: int,
            modes: tuple[str, ...]) -> tuple[dict[str, float], str]:  # fmt: skip
    plain = samples_per_second(model, data, batch, None, classes)
    entry: dict[str, float] = {"plain": plain}
    cells = [f"plain {plain:6.0f}/s"]
    for mode in modes:
        entry[mode] = samples_per_second(model, data, batch, mode, classes)
        entry[f"{mode}_vs_plain"] = entry[mode] / plain
        cells.append(f"{mode} {entry[mode]:6.0f}/s ({entry[f'{mode}_vs_plain']:.2f}x)")
    return entry, "  ".join(cells)


def run(quick: bool = False) -> dict[str, Any]:
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook warnings, once per call
    torch.manual_seed(0)
    n = 2048 if quick else 6000
    batch = scenario_batch()
    images = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    texts = TensorDataset(torch.rand(n, 4096), torch.randint(0, 4, (n,)))
    mode = RunConfig().grad_sample_mode  # the project's DP path
    result: dict[str, Any] = {"examples": n, "scenario_batch": batch, "default_mode": mode}
    rows = []
    thread_counts = (1,) if quick else (1, 2)
    lenet_batches = (64, batch) if quick else tuple(sorted({64, 128, batch, 2 * batch}))
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for b in lenet_batches:
            key = f"lenet5@{b}/{threads}t"
            result[key], line = measure("lenet5", images, 10, b, MODES)
            rows.append((f"lenet5 batch {b:4d}, {threads} thread(s)", line))
    torch.set_num_threads(1)
    for model, b in (("text-linear", 64), ("text-mlp", 64), ("text-linear", 128)):
        key = f"{model}@{b}/1t"
        result[key], line = measure(model, texts, 4, b, ("bookkeeping", "ghost", "hooks"))
        rows.append((f"{model} batch {b}, 1 thread", line))
    scenario = result[f"lenet5@{batch}/1t"]
    result["scenario_ratio"] = scenario[f"{mode}_vs_plain"]
    result["peak_rss_mb"] = peak_rss_mb()
    print("dp: local training throughput, samples/s (ratio = DP / plain, same process)")
    table([
        *rows,
        (f"project DP path ({mode}) at scenario batch {batch}, 1 thread",
         f"{scenario[mode]:.0f}/s vs plain {scenario['plain']:.0f}/s = "
         f"{result['scenario_ratio']:.2f}x"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MB"),
    ])  # fmt: skip
    save("dp", result)
    return result
