"""One data holder's privacy state: its policy, lifetime account and lifetime ledger.

This is the one owner of what a client may spend. The run config (written by the server's
operator) is only a *request*; the holder's :class:`~common.privacy.policy.PrivacyPolicy`
decides. Per data set (the policy's ``dataset-id``) the session keeps, across every run:

* the accountant history ``(σ, q, steps)`` of every round ever trained, composed by Opacus's
  accountant -- so a new run starts where the last one stopped, never at ε = 0;
* the signed, hash-chained ledger of those rounds (:class:`ClientLedger`);
* per run, the terms fixed at the run's first round (σ calibrated for the planned run, ε at
  the run's start, the most this run may add), so a restarted client keeps them.

Persistence: with a state file (the holder's ``state-dir``) the session is read before and
written after every round, atomically and encrypted under the holder's data key
(:mod:`client.persistence`). Without one (a simulated holder with no home) it lives in
Flower's ``context.state`` for one run only; the report then says so.

``plan_round`` refuses (raises :class:`PolicyRefusal` / :class:`PrivacyBudgetExceeded`) before
any private data is touched; ``commit`` records what the optimizer actually did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import persistence
from common.config import RunConfig
from common.crypto import Identity
from common.files import file_lock
from common.privacy.accounting import (
    Mechanism,
    PrivacyBudgetExceeded,
    calibrate_noise_after,
    epsilon_of,
    merge_history,
    steps_per_epoch,
)
from common.privacy.ledger import ClientLedger, LedgerEntry
from common.privacy.policy import PolicyRefusal, PrivacyPolicy

log = logging.getLogger("fedvault.client")

STATE_FORMAT = "fedvault-holder-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class RunTerms:
    """What one run may do, fixed when the holder first trains in it."""

    noise_multiplier: float
    epsilon_at_start: float  # lifetime ε spent before this run
    run_budget: float  # the most this run may add (what it asked; never over the lifetime left)


@dataclass(frozen=True)
class RoundPlan:
    """The mechanism of one round, checked against the policy before training."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    declared_examples: int
    batch_size: int
    epochs: int
    max_grad_norm: float
    epsilon_after: float
    terms: RunTerms

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacySession:
    policy: PrivacyPolicy
    ledger: ClientLedger
    history: list[Mechanism] = field(default_factory=list)
    runs: dict[str, RunTerms] = field(default_factory=dict)

    # -- reading the account -------------------------------------------------------------------
    @property
    def spent(self) -> float:
        """Lifetime ε at the policy's δ over every round ever trained on this data set."""
        return epsilon_of(self.history, self.policy.delta, self.policy.accountant)

    def _epsilon_with(self, mechanism: Mechanism) -> float:
        return epsilon_of([*self.history, mechanism], self.policy.delta, self.policy.accountant)

    # -- one round -----------------------------------------------------------------------------
    def plan_round(self, cfg: RunConfig, run_id: str, true_examples: int) -> RoundPlan:
        """The round the run asks for, if the policy allows it; else raise, naming the rule.

        ``true_examples`` is used only when the policy declares no size (then the true size
        is what the holder publishes; logged)."""
        self._check_request(cfg)
        declared = self.policy.declared_examples or true_examples
        k = steps_per_epoch(declared, cfg.batch_size)
        q = 1.0 / k
        steps = cfg.local_epochs * k
        terms = self.runs.get(run_id) or self._new_run_terms(cfg, q, steps)
        sigma = terms.noise_multiplier
        after = self._epsilon_with((sigma, q, steps))
        spent = self.spent
        rules = [
            (
                after <= self.policy.lifetime_epsilon,
                f"this round would raise the lifetime ε of data set {self.policy.dataset_id!r} "
                f"from {spent:.4f} to {after:.4f}, over its lifetime budget "
                f"{self.policy.lifetime_epsilon:g} (δ={self.policy.delta:g})",
            ),
            (
                after - terms.epsilon_at_start <= terms.run_budget + 1e-12,
                f"this round would take the run's spend to "
                f"{after - terms.epsilon_at_start:.4f}, over what this run may add "
                f"({terms.run_budget:.4f})",
            ),
            (
                after - spent <= self.policy.max_round_epsilon,
                f"this round would add ε {after - spent:.4f}, over the policy's "
                f"max-round-epsilon {self.policy.max_round_epsilon:g}",
            ),
        ]
        for ok, why in rules:
            if not ok:
                raise PrivacyBudgetExceeded(
                    f"privacy budget exhausted: {why}; the client refuses to train"
                )
        return RoundPlan(
            noise_multiplier=sigma, sample_rate=q, steps=steps, steps_per_epoch=k,
            declared_examples=declared, batch_size=cfg.batch_size, epochs=cfg.local_epochs,
            max_grad_norm=cfg.max_grad_norm, epsilon_after=after, terms=terms,
        )  # fmt: skip

    def _check_request(self, cfg: RunConfig) -> None:
        """What the run config asks that no budget arithmetic covers."""
        p = self.policy
        if not cfg.dp:
            p.check_no_dp()
            return
        if cfg.target_delta != p.delta:
            raise PolicyRefusal(
                f"the run asks for δ={cfg.target_delta:g}, but this holder states every ε at "
                f"δ={p.delta:g} (its policy): set target-delta = {p.delta:g}"
            )
        if cfg.noise_multiplier and cfg.noise_multiplier < p.min_noise_multiplier:
            raise PolicyRefusal(
                f"the run asks for noise multiplier {cfg.noise_multiplier:g}, below this "
                f"holder's min-noise-multiplier {p.min_noise_multiplier:g}"
            )

    def _new_run_terms(self, cfg: RunConfig, q: float, steps_per_round: int) -> RunTerms:
        """σ for the whole planned run, so that it adds at most what the run asks for.

        A run that asks for more than the data set's lifetime budget has left is refused, not
        quietly given less: the operator learns what is left and asks for it explicitly."""
        spent = self.spent
        left = self.policy.lifetime_epsilon - spent
        where = (
            f"data set {self.policy.dataset_id!r} has spent ε {spent:.4f} of its lifetime "
            f"budget {self.policy.lifetime_epsilon:g} (δ={self.policy.delta:g})"
        )
        if left <= 0:
            raise PrivacyBudgetExceeded(f"privacy budget exhausted: {where}; the client refuses")
        if cfg.target_epsilon > left:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: the run asks for up to ε {cfg.target_epsilon:g}, "
                f"but {where}: {math.floor(left * 1e4) / 1e4:.4f} is left (set target-epsilon "
                "to at most that)"
            )
        planned = cfg.num_server_rounds * steps_per_round
        if cfg.noise_multiplier:
            sigma = cfg.noise_multiplier
        else:
            try:
                sigma = calibrate_noise_after(
                    self.history, target_epsilon=spent + cfg.target_epsilon,
                    target_delta=self.policy.delta, sample_rate=q, total_steps=planned,
                    accountant=self.policy.accountant,
                )  # fmt: skip
            except ValueError as err:
                raise PrivacyBudgetExceeded(f"privacy budget too small: {err}") from None
        sigma = max(sigma, self.policy.min_noise_multiplier)
        log.info(
            "privacy plan for data set %r: σ=%.4f for %d steps at q=%.4f; lifetime ε %.4f "
            "spent, this run may add ≤ %g (lifetime budget %g at δ=%g, %s)",
            self.policy.dataset_id, sigma, planned, q, spent, cfg.target_epsilon,
            self.policy.lifetime_epsilon, self.policy.delta, self.policy.accountant,
        )  # fmt: skip
        return RunTerms(sigma, spent, cfg.target_epsilon)

    def commit(
        self,
        plan: RoundPlan,
        ran: Mechanism,
        *,
        run_id: str,
        server_round: int,
        partition_id: int,
        node_id: str,
        signer: Identity | None,
    ) -> LedgerEntry:
        """Record the round Opacus ran (it must be the planned one) and sign its entry."""
        if ran != plan.mechanism:  # the ledger must say what was actually spent
            raise RuntimeError(f"Opacus ran {ran}, but the plan was {plan.mechanism}")
        self.runs[run_id] = plan.terms
        self.history = merge_history([*self.history, ran])
        epsilon = self.spent
        return self.ledger.append(
            run_id=run_id, round=server_round, partition_id=partition_id, node_id=node_id,
            num_examples=plan.declared_examples, batch_size=plan.batch_size, epochs=plan.epochs,
            sample_rate=plan.sample_rate, steps=plan.steps,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            delta=self.policy.delta, accountant=self.policy.accountant,
            epsilon_cumulative=epsilon, epsilon_budget=self.policy.lifetime_epsilon,
            run_epsilon_budget=plan.terms.run_budget, signer=signer,
        )  # fmt: skip

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "dataset_id": self.policy.dataset_id,
                "history": [list(m) for m in self.history],
                "runs": {r: vars(t) for r, t in self.runs.items()},
                "ledger": self.ledger.to_json(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, policy: PrivacyPolicy) -> PrivacySession:
        data: dict[str, Any] = json.loads(text)
        if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} document")
        if data["dataset_id"] != policy.dataset_id:
            raise ValueError(
                f"state of data set {data['dataset_id']!r} read for {policy.dataset_id!r}"
            )
        session = cls(
            policy=policy,
            ledger=ClientLedger.from_json(data["ledger"]),
            history=merge_history(data["history"]),
            runs={r: RunTerms(**t) for r, t in data["runs"].items()},
        )
        if session.ledger.last is not None and abs(
            session.ledger.epsilon_spent - session.spent
        ) > 1e-9 * max(1.0, session.spent):
            raise ValueError("state is inconsistent: the ledger's ε differs from the history's")
        return session

    @classmethod
    def new(cls, policy: PrivacyPolicy) -> PrivacySession:
        return cls(policy=policy, ledger=ClientLedger(policy.dataset_id))


def state_file(state_dir: str | Path, policy: PrivacyPolicy) -> Path:
    """Where a holder keeps the state of one data set: keyed by the policy's data set id,
    never by the run (a new run must find what earlier runs spent)."""
    return Path(state_dir) / f"{policy.dataset_id}.privacy-state"


def load_session(path: Path | None, policy: PrivacyPolicy, key: Identity | None) -> PrivacySession:
    """The holder's session from ``path`` (or a new one when there is none yet)."""
    if path is None:
        return PrivacySession.new(policy)
    saved = persistence.load(path, key)
    if saved is None:
        log.info("no privacy state for data set %r yet: starting its ledger", policy.dataset_id)
        return PrivacySession.new(policy)
    try:
        return PrivacySession.from_json(saved, policy)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"privacy state {path} is unusable ({err}): restore it from a backup; do not "
            "delete it (that would reset the data set's spent budget)"
        ) from None


def save_session(path: Path, session: PrivacySession, key: Identity | None) -> None:
    persistence.save(path, session.to_json(), key)


@contextlib.contextmanager
def exclusive(path: Path | None) -> Iterator[None]:
    """Hold the holder's state for one round: read, plan, train, commit, write.

    A SuperNode may be asked to train in two runs at once; without the lock both would read
    the same spent ε and the later write would erase the earlier round's spend (the server
    could double a holder's budget by running two runs in parallel). A file lock beside the
    state serialises them, across processes."""
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield
