"""What the ServerApp and ClientApp put in messages: record keys and error codes.

server/ and client/ never import each other; this module is their shared vocabulary.
"""

from __future__ import annotations

ARRAYS = "arrays"  # ArrayRecord: model weights (FedAvg's default key)
CONFIG = "config"  # ConfigRecord: per-round instructions (FedAvg's default key)
METRICS = "metrics"  # MetricRecord: what a client reports with its update
NODE_INFO = "node-info"  # ConfigRecord: reply to the partition-discovery query
LEDGER = "ledger"  # ConfigRecord {"entry": one ledger.jsonl line}: this round's privacy expense

# Train metrics. FedAvg weights by NUM_EXAMPLES.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative ε of this client after this round
ROUND_EPSILON = "round-epsilon"  # what this round added to the cumulative ε
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
MAX_GRAD_NORM = "max-grad-norm"
DELTA = "delta"
TRAIN_SECONDS = "train-seconds"

# Evaluate metrics.
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
EVAL_SECONDS = "eval-seconds"  # wall seconds of the evaluate handler (data, model, scoring)

# Error codes in error replies (Flower's own codes are small integers).
PRIVACY_BUDGET_EXHAUSTED = 4001
