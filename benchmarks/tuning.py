"""Accuracy tuning for ``mnist-iid-dp`` without the simulation engine's start-up.

``python -m benchmarks.tuning [--clients 10] [--batch 256] [--lr 2.0] [--clip 1.0] ...``

Runs FedAvg in one process over the clients' real code path (``load_partition``,
``calibrate_noise`` with the whole run's steps, ``train_local`` with Opacus DP-SGD), one
client after the other, and prints the global model's test accuracy after every round: the
global model itself, exponential moving averages of it (post-processing, free in privacy),
and, with ``--server-momentum``, FedAvgM. ``--clients 1 --batch 2560`` is central DP-SGD
with the same σ, q and steps as 10 clients at batch 256. Not part of ``python -m
benchmarks``: a tool for exploring settings; confirm a setting with ``fedvault simulate``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from benchmarks.common import SHARED_DATA
from client.training import DPSettings, train_local
from common.data import DataSpec, load_partition, load_test_set
from common.evaluation import evaluate
from common.models import LeNet5
from common.privacy.accounting import calibrate_noise, epsilon_of, sample_rate_for, steps_per_epoch

EMA_DECAYS = (0.5, 0.7, 0.9)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuning")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--activation", default="tanh")
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG warning, once per round
    torch.set_num_threads(1)

    spec = DataSpec("mnist", a.data_dir, a.seed)
    parts = [load_partition(spec, i, a.clients) for i in range(a.clients)]
    test = load_test_set(spec)
    n = len(parts[0].train)
    q = sample_rate_for(n, a.batch)
    steps = a.rounds * a.epochs * steps_per_epoch(n, a.batch)
    sigma = calibrate_noise(target_epsilon=a.epsilon, target_delta=a.delta, sample_rate=q,
                            total_steps=steps, accountant="prv")  # fmt: skip
    spent = epsilon_of([(sigma, q, steps)], a.delta, "prv")
    print(f"σ {sigma:.3f}, q {q:.4f}, {steps} steps per client: ε {spent:.3f} at δ {a.delta:g}")

    dp = DPSettings(sigma, a.clip, q, steps_per_epoch(n, a.batch), "prv", "bookkeeping")
    torch.manual_seed(a.seed)
    model = LeNet5(10, a.activation)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    velocity = {k: torch.zeros_like(v) for k, v in weights.items()}
    emas: dict[float, dict[str, torch.Tensor]] = {}
    started = time.time()
    for server_round in range(1, a.rounds + 1):
        mean = {k: torch.zeros_like(v) for k, v in weights.items()}
        for part in parts:
            local = LeNet5(10, a.activation)
            local.load_state_dict(weights)
            train_local(local, part.train, epochs=a.epochs, batch_size=a.batch,
                        learning_rate=a.lr, dp=dp)  # fmt: skip
            for k, v in local.state_dict().items():
                mean[k] += v / len(parts)  # IID shares: equal sizes, so equal FedAvg weights
        for k in weights:
            velocity[k] = a.server_momentum * velocity[k] + (mean[k] - weights[k])
            weights[k] = weights[k] + a.server_lr * velocity[k]
        row: dict[str, float | int] = {"round": server_round}
        model.load_state_dict(weights)
        row["accuracy"] = evaluate(model, test).accuracy
        for d in EMA_DECAYS:
            prev = emas.get(d)
            emas[d] = {k: v.clone() if prev is None else d * prev[k] + (1 - d) * v
                       for k, v in weights.items()}  # fmt: skip
            model.load_state_dict(emas[d])
            row[f"ema{d}"] = evaluate(model, test).accuracy
        row["seconds"] = round(time.time() - started)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
