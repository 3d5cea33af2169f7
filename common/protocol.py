"""What the ServerApp and ClientApp put in messages: record keys and error codes.

server/ and client/ never import each other; this module is their shared vocabulary.
"""

from __future__ import annotations

ARRAYS = "arrays"  # ArrayRecord: model weights (FedAvg's default key)
CONFIG = "config"  # ConfigRecord: per-round instructions (FedAvg's default key)
METRICS = "metrics"  # MetricRecord: what a client reports with its update
NODE_INFO = "node-info"  # ConfigRecord: reply to the partition-discovery query
LEDGER = "ledger"  # ConfigRecord {LEDGER_ENTRIES: [ledger.jsonl lines]}: the holder's new entries
LEDGER_ENTRIES = "entries"
REFUSAL = "refusal"  # ConfigRecord {"code": int, "reason": str}: the holder refuses this round

# Train metrics (everything a client reports: see README, "Privacy accounting, precisely").
# FedAvg weights by NUM_EXAMPLES: the holder's declared, public data set size.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
EPSILON = "epsilon"  # cumulative ε of this client after this round
ROUND_EPSILON = "round-epsilon"  # what this round added to the cumulative ε
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
MAX_GRAD_NORM = "max-grad-norm"
DELTA = "delta"

# Evaluate metrics.
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# Refusal codes (in REFUSAL records; Flower's own error codes are small integers).
PRIVACY_BUDGET_EXHAUSTED = 4001
POLICY_REFUSED = 4002  # the run asks for more than the holder's policy allows
DATA_UNUSABLE = 4003  # the holder's data fails authentication or validation: every round would
