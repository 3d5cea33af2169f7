"""A data holder's signed, hash-chained privacy ledger: one entry per DP round it trains.

Why a ledger when ``metrics.json`` already has ε: ``metrics.json`` is written by the server,
and nothing in it lets a third party tell an honest record from an edited one. The ledger is
written *by each client* about its own privacy spend, and every entry

* names the raw mechanism (σ, q, steps, C, δ, accountant) and what q and steps derive from
  (the declared data set size n, the batch size B, the local epochs), so anyone can recompute
  ε with an independent accountant instead of trusting the claimed number;
* is chained to the holder's previous entry by ``prev_hash`` and numbered by ``seq``, so a
  dropped, duplicated or reordered entry breaks the chain;
* is signed by the client's Ed25519 key, so the server (which stores the ledger) cannot alter
  an entry, or write one, without the signature check failing.

A chain is the holder's **lifetime** on one data set (its policy's ``dataset-id``), not one
run: ``chain_id`` is random (made when the holder's state is created, so it reveals nothing
about the data) and every run the holder trains in extends the same chain, so
``epsilon_cumulative`` is the lifetime spend and ``run_id`` / ``round`` say where each entry
was spent. The holder sends the server its whole chain once per run (the entries before the
run with its first reply), so every run directory holds complete chains from genesis.

Line format (``ledger.jsonl``, one JSON object per line, UTF-8)::

    {"chain_id": "<32 hex>", "seq": 7, "dataset_id": "hospital-a-2026", "unit": "record",
     "run_id": "1713...", "round": 3, "partition_id": 2, "node_id": "8731...",
     "num_examples": 480, "batch_size": 32, "epochs": 1, "sample_rate": 0.0667, "steps": 15,
     "noise_multiplier": 0.7367, "max_grad_norm": 1.0, "delta": 1e-05, "accountant": "prv",
     "epsilon_round": 0.86, "epsilon_cumulative": 6.58, "epsilon_budget": 8.0,
     "run_epsilon_budget": 8.0, "time": "2025-01-01T12:00:00.000Z", "prev_hash": "<64 hex>",
     "kind": "client-dp-sgd", "hash": "<64 hex>", "signer": "<16 hex key id or empty>",
     "signature": "<base64 64 bytes or empty>"}

* ``unit`` names the neighbouring relation the ε is in: ``record`` = add or remove one record
  of this holder's data set.
* ``num_examples`` is the size the holder *declares* (public by the holder's choice; see the
  README's "Privacy accounting, precisely"): q = 1/⌈n/B⌉ and steps = epochs·⌈n/B⌉ derive from
  it, so the audit can check them.
* ``epsilon_budget`` is the holder's lifetime budget (its policy); ``run_epsilon_budget`` the
  most this run could add, as the run asked and the policy allowed.
* ``hash`` = SHA-256 (hex) of the *canonical JSON* of every field except ``hash`` and
  ``signature``: ``json.dumps(fields, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False, allow_nan=False)`` encoded as UTF-8, ints as ints and the float fields as
  Python floats (so ``8`` and ``8.0`` hash alike; a reader coerces before hashing).
* ``prev_hash`` = the ``hash`` of the chain's previous entry, ``"0" * 64`` for ``seq`` 1.
* ``signature`` = base64 Ed25519 signature over ``b"fedvault ledger v2\\0" || bytes.fromhex(hash)``
  (the label keeps a ledger signature from ever being valid as any other fedvault signature,
  or as a signature of the v1 format). ``signer`` is the client's Ed25519 key id; both are
  ``""`` when the client has no key.

What the ledger cannot show on its own: that the *last* entries of a chain were not dropped
(a truncated chain is still a valid chain). The audit cross-checks the rounds in
``metrics.json`` and, given several runs, that every run's copy of a chain extends the
others; the holder itself knows its head.
"""

from .chain import ClientLedger
from .entry import (
    GENESIS_HASH,
    KIND_CLIENT_DP_SGD,
    SIGNATURE_LABEL,
    UNIT_RECORD,
    LedgerEntry,
    LedgerError,
    utc_now,
)
from .io import LEDGER_FILE, append_ledger, parse_ledger, read_ledger, write_ledger

__all__ = [
    "GENESIS_HASH",
    "KIND_CLIENT_DP_SGD",
    "LEDGER_FILE",
    "SIGNATURE_LABEL",
    "UNIT_RECORD",
    "ClientLedger",
    "LedgerEntry",
    "LedgerError",
    "append_ledger",
    "parse_ledger",
    "read_ledger",
    "utc_now",
    "write_ledger",
]
