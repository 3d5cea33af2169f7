"""A client's own chain (:class:`ClientLedger`): it appends one sealed entry per DP round
trained, after checking the round order, the accountant, the mechanism and that ε never
decreases, and persists as one JSON document the holder keeps with its state."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from common.privacy import ACCOUNTANTS

from .entry import (
    GENESIS_HASH,
    KIND_CLIENT_DP_SGD,
    UNIT_RECORD,
    LedgerEntry,
    LedgerError,
    utc_now,
)

if TYPE_CHECKING:
    from common.crypto.keys import Identity

CLIENT_LEDGER_FORMAT = "fedvault-client-ledger"
FORMAT_VERSION = 2


class ClientLedger:
    """One holder's lifetime chain on one data set: it appends an entry per DP round trained.

    The holder keeps it (``to_json``, saved with its account in its own state), so it can
    always extend its own chain, in any later run, and hand the new entries to the server.
    """

    def __init__(
        self,
        dataset_id: str,
        chain_id: str | None = None,
        entries: Iterable[LedgerEntry] = (),
    ) -> None:
        self.dataset_id = str(dataset_id)
        # random, so the id that travels with every entry says nothing about the data
        self.chain_id = chain_id or secrets.token_hex(16)
        self._entries: list[LedgerEntry] = list(entries)
        for entry in self._entries:
            if entry.chain_id != self.chain_id:
                raise LedgerError(
                    f"entry of chain {entry.chain_id} does not belong to chain {self.chain_id}"
                )

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def last(self) -> LedgerEntry | None:
        return self._entries[-1] if self._entries else None

    @property
    def epsilon_spent(self) -> float:
        return self._entries[-1].epsilon_cumulative if self._entries else 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def append(
        self,
        *,
        run_id: str,
        round: int,
        partition_id: int,
        node_id: str,
        num_examples: int,
        batch_size: int,
        epochs: int,
        sample_rate: float,
        steps: int,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        accountant: str,
        epsilon_cumulative: float,
        epsilon_budget: float,
        run_epsilon_budget: float,
        signer: Identity | None,
        kind: str = KIND_CLIENT_DP_SGD,
        time: str | None = None,
    ) -> LedgerEntry:
        """Record one trained round; returns the sealed entry (send it to the server).

        ``epsilon_round`` is derived here as the difference of cumulative values, so the
        ledger is consistent by construction (it is not a per-round ε from a fresh
        accountant, which would understate what composition costs).
        """
        last = self.last
        if last is not None and last.run_id == str(run_id) and round <= last.round:
            raise LedgerError(
                f"run {run_id}: round {round} cannot follow round {last.round} in the ledger "
                "(rounds of a run strictly increase)"
            )
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
        _check_mechanism(num_examples, sample_rate, steps, noise_multiplier, max_grad_norm, delta)
        previous = last.epsilon_cumulative if last is not None else 0.0
        if not math.isfinite(epsilon_cumulative) or epsilon_cumulative < previous:
            raise LedgerError(
                f"run {run_id}, round {round}: cumulative ε {epsilon_cumulative} is below the "
                f"previous {previous} (ε never decreases)"
            )
        entry = LedgerEntry(
            chain_id=self.chain_id,
            seq=len(self._entries) + 1,
            dataset_id=self.dataset_id,
            unit=UNIT_RECORD,
            run_id=str(run_id),
            round=int(round),
            partition_id=int(partition_id),
            node_id=str(node_id),
            num_examples=int(num_examples),
            batch_size=int(batch_size),
            epochs=int(epochs),
            sample_rate=float(sample_rate),
            steps=int(steps),
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            delta=float(delta),
            accountant=accountant,
            epsilon_round=float(epsilon_cumulative) - previous,
            epsilon_cumulative=float(epsilon_cumulative),
            epsilon_budget=float(epsilon_budget),
            run_epsilon_budget=float(run_epsilon_budget),
            time=time or utc_now(),
            prev_hash=last.hash if last is not None else GENESIS_HASH,
            kind=kind,
        ).sealed(signer)
        self._entries.append(entry)
        return entry

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CLIENT_LEDGER_FORMAT,
                "version": FORMAT_VERSION,
                "dataset_id": self.dataset_id,
                "chain_id": self.chain_id,
                "entries": [e.to_dict() for e in self._entries],
            },
            ensure_ascii=False,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> ClientLedger:
        """Restore a ledger; refuses one whose chain is not intact (do not extend a broken one)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(f"client ledger is not valid JSON ({err.msg})") from None
        if not isinstance(data, dict) or data.get("format") != CLIENT_LEDGER_FORMAT:
            raise LedgerError(f"not a {CLIENT_LEDGER_FORMAT} document")
        if data.get("version") != FORMAT_VERSION:
            raise LedgerError(f"unsupported client ledger version {data.get('version')!r}")
        entries = [LedgerEntry.from_dict(e) for e in data.get("entries", [])]
        ledger = cls(data["dataset_id"], data["chain_id"], entries)
        ledger._check_intact()
        return ledger

    def _check_intact(self) -> None:
        from common.privacy.verification import verify_chain

        errors = [f for f in verify_chain(self._entries, None) if f.is_error]
        if errors:
            raise LedgerError(f"client ledger is not intact: {errors[0].message}")


def _check_mechanism(
    num_examples: int,
    sample_rate: float,
    steps: int,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
) -> None:
    problems = []
    if num_examples < 1:
        problems.append(f"num_examples={num_examples} (needs ≥ 1)")
    if not 0 < sample_rate <= 1:
        problems.append(f"sample_rate={sample_rate} (needs 0 < q ≤ 1)")
    if steps < 1:
        problems.append(f"steps={steps} (needs ≥ 1)")
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        problems.append(f"noise_multiplier={noise_multiplier} (needs σ > 0)")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        problems.append(f"max_grad_norm={max_grad_norm} (needs C > 0)")
    if not 0 < delta < 1:
        problems.append(f"delta={delta} (needs 0 < δ < 1)")
    if problems:
        raise LedgerError("invalid DP-SGD mechanism: " + ", ".join(problems))
