"""Recompute ε from raw mechanism parameters with Opacus's RDP and PRV accountants, fast.

Why not just call :func:`common.privacy.accounting.epsilon_of` per ledger entry: an audit
recomputes ε for *every prefix* of every client's chain (100 clients × 50 rounds = 5,000
histories, twice), and one Opacus call costs 40-600 ms, most of it recomputing the same
per-order RDP curve (``_compute_rdp`` over ~70 orders, a slow series for fractional orders)
that the PRV accountant also needs to size its domain.

This module follows Opacus's own code path step by step -- same functions, same arguments,
same order of floating-point operations -- but

* computes the one-step RDP curve of each ``(σ, q)`` once: RDP composes linearly, and Opacus
  itself computes ``steps`` steps as ``curve * steps``, so reusing the curve is exact;
* caches every ε by ``(accountant, δ, merged history)``: clients with the same mechanism and
  the same round count (the common IID case) share every value.

The results are *bit-identical* to ``epsilon_of`` (the tests assert equality, and each
:class:`Recomputer` re-checks itself against ``epsilon_of`` on its first history of each
accountant and falls back to ``epsilon_of`` for good if they ever differ, e.g. after an
Opacus upgrade changed its internals). For PRV this is Opacus's *upper* bound, as the client
reports it: privacy math is never approximate in the client's favour.

That is still ~0.2 s per PRV prefix (Opacus sizes its FFT grid for ε to ±0.01 over the whole
history, often an FFT-unfriendly length), i.e. ~10 s per client of 50 rounds when clients do
not share a mechanism (non-IID partitions: every client has its own q and σ). So the audit
first asks :meth:`Recomputer.prv_bounds` for *rigorous upper bounds* on each prefix's PRV ε:
the same PRV method (Gopi et al.; Opacus's discretisation, truncation and FFT composition),
but one grid per chain shared by all its prefixes, FFT-friendly lengths, and an ε error
``eps_error_k = 0.01 + slack_k`` just small enough to decide that prefix. A bound is valid for
any error it is computed for (a coarser grid widens ``eps_upper``, it never lowers it); only
a claim the bound cannot clear is recomputed exactly, so every *failure* is confirmed with
Opacus's exact number and every *pass* rests on a valid upper bound.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft

from common.privacy.accounting import ACCOUNTANTS, Mechanism, epsilon_of, merge_history

log = logging.getLogger("fedvault.audit.recompute")

History = tuple[Mechanism, ...]
# (σ, q, δ, step totals of each prefix, slack of each prefix): one prv_bounds call
BoundRequest = tuple[float, float, float, tuple[int, ...], tuple[float, ...]]

# Opacus's PRVAccountant.get_epsilon defaults.
PRV_EPS_ERROR = 0.01
# Bounds: extra ε error never below this (keeps grids finite), never above 1 (Opacus's domain
# sizing is only known to be safe for eps_error < 1), and no grid above this many points.
MIN_SLACK = 0.001
MAX_EPS_ERROR = 1.0
MAX_GRID = 1 << 22


def _opacus_internals() -> dict[str, object] | None:
    """Opacus's building blocks (from :mod:`common.privacy.opacus_internals`), or None if they
    cannot be imported, e.g. on an Opacus outside the verified range (use epsilon_of then)."""
    try:
        from common.privacy import opacus_internals as oi
    except ImportError as err:  # pragma: no cover - depends on the installed Opacus
        log.warning("Opacus internals not found (%s): recomputing ε the slow way", err)
        return None
    return {
        "alphas": oi.RDP_DEFAULT_ALPHAS,
        "compute_rdp": oi.compute_rdp,
        "get_privacy_spent": oi.get_privacy_spent,
        "Domain": oi.Domain,
        "PRV": oi.PoissonSubsampledGaussianPRV,
        "TruncatedPRV": oi.TruncatedPrivacyRandomVariable,
        "compose": oi.compose_heterogeneous,
        "discretize": oi.discretize,
        "DiscretePRV": oi.DiscretePRV,
    }


class Recomputer:
    """ε of merged accountant histories, cached; one instance per audit.

    Not thread-safe (plain dict caches); an audit is single-threaded.
    """

    def __init__(self) -> None:
        self._ops = _opacus_internals()
        self._curves: dict[tuple[float, float], np.ndarray] = {}
        self._cache: dict[tuple[str, float, History], float] = {}
        self._bounds: dict[tuple, list[float | None]] = {}
        self._checked: set[str] = set()
        self.computed = 0  # distinct histories actually computed (not cache hits)

    # -- public -------------------------------------------------------------------------------
    def epsilon(self, history: Iterable[Sequence[float]], delta: float, accountant: str) -> float:
        """ε of ``history`` at ``delta``: equal to ``epsilon_of(history, delta, accountant)``."""
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}")
        merged: History = tuple(merge_history(history))
        if not merged:
            return 0.0
        key = (accountant, float(delta), merged)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        value = self._compute(merged, float(delta), accountant)
        self._cache[key] = value
        self.computed += 1
        return value

    def prefixes(
        self, mechanisms: Sequence[Mechanism], deltas: Sequence[float], accountant: str
    ) -> list[float]:
        """Cumulative ε after each prefix ``mechanisms[:k+1]`` (at ``deltas[k]``).

        The merged history of each prefix is built incrementally (the chain's mechanism is
        usually constant, so every prefix is one ``(σ, q, k·steps)`` entry).
        """
        out: list[float] = []
        history: list[Mechanism] = []
        for mechanism, delta in zip(mechanisms, deltas, strict=True):
            history = merge_history([*history, mechanism])
            out.append(self.epsilon(history, delta, accountant))
        return out

    def prv_bounds(
        self,
        sigma: float,
        q: float,
        delta: float,
        totals: Sequence[int],
        slacks: Sequence[float],
    ) -> list[float | None]:
        """Rigorous upper bounds on the PRV ε of ``totals[k]`` steps of one mechanism.

        ``slacks[k]`` is how far above Opacus's own ``eps_upper`` (error 0.01) the bound may
        lie: the bound is ``eps_upper`` computed with ``eps_error = 0.01 + slacks[k]``.
        Prefixes whose slacks need similar grids share one (discretised once, one forward
        FFT; each prefix is then a power, an inverse FFT and a search). ``None`` where no
        bound was computed (grid too large, or a numerical edge case): recompute exactly.
        """
        key = request_key(sigma, q, delta, totals, slacks)
        cached = self._bounds.get(key)
        if cached is not None:
            return list(cached)
        out: list[float | None] = [None] * len(totals)
        if self._ops is not None and totals:
            errors = [min(PRV_EPS_ERROR + max(MIN_SLACK, s), MAX_EPS_ERROR) for s in slacks]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for band in _bands(totals, errors, delta):
                    try:
                        values = self._bound_band(sigma, q, delta, totals, errors, band)
                    except Exception as err:  # an edge case: exact recomputation decides
                        log.debug("PRV bound failed for σ=%s q=%s (%s)", sigma, q, err)
                        continue
                    for k, value in zip(band, values, strict=True):
                        out[k] = value
        self._bounds[key] = out
        return list(out)

    def _bound_band(
        self,
        sigma: float,
        q: float,
        delta: float,
        totals: Sequence[int],
        errors: Sequence[float],
        band: list[int],
    ) -> list[float | None]:
        """One grid for the prefixes in ``band``: fine enough and wide enough for each."""
        ops = self._ops
        assert ops is not None
        delta_error = delta / 1000
        log_term = np.log(12 / delta_error) / 2
        n_max = max(totals[k] for k in band)
        mesh = min(errors[k] / np.sqrt(totals[k] * log_term) for k in band)
        # Opacus's safe domain for the band's longest history (wider also covers shorter ones)
        l_max = self._rdp(((sigma, q, n_max),), delta_error / 4)
        l_max = max(l_max, self._rdp(((sigma, q, 1),), delta_error / (8 * n_max)))
        size_l = max(l_max, max(errors[k] for k in band)) + 3
        base = ops["Domain"].create_aligned(-size_l, size_l, mesh)  # type: ignore[attr-defined]
        size = _even_fast_len(base.size)
        if size > MAX_GRID:
            return [None] * len(band)
        half = size // 2  # same layout as create_aligned: zero at index half - 1
        domain = ops["Domain"](float(-(half - 1) * mesh), float(half * mesh), size)  # type: ignore[operator]
        prv = ops["PRV"](q, sigma)  # type: ignore[operator]
        truncated = ops["TruncatedPRV"](prv, domain.t_min, domain.t_max)  # type: ignore[operator]
        one = ops["discretize"](truncated, domain)  # type: ignore[operator]
        spectrum = rfft(one.pmf)
        values: list[float | None] = []
        # spectrum**n for increasing n, one multiplication per prefix (a complex power of the
        # whole spectrum per prefix would cost more than the inverse FFT itself)
        steps: dict[int, np.ndarray] = {}
        power: np.ndarray | None = None
        done = 0
        for k in band:
            n = int(totals[k])
            gap = n - done
            if gap not in steps:
                steps[gap] = spectrum**gap
            power = steps[gap] if power is None else power * steps[gap]
            done = n
            # compose_heterogeneous's _compose_fourier for n self-compositions
            pmf = irfft(power, n=size)
            shift = n - 1 + (size // 2 if n % 2 == 0 else 0)
            pmf = np.roll(pmf, shift)
            composed = ops["DiscretePRV"](  # type: ignore[operator]
                pmf=pmf, domain=one.domain.shift_right(one.domain.shifts * (n - 1))
            )
            _, _, upper = composed.compute_epsilon(delta, delta_error, errors[k])
            values.append(float(upper) if math.isfinite(upper) else None)
        return values

    def prefetch(self, requests: Iterable[BoundRequest], workers: int) -> None:
        """Compute the distinct ``prv_bounds`` requests in ``workers`` processes, into the cache.

        Only worth it when many clients have their own mechanism (then each needs its own
        grid and RDP curve, ~0.3 s). Uses ``fork`` (children inherit the loaded Opacus; spawn
        would re-import torch in each), so callers that run inside a multi-threaded server
        should keep ``workers=1``: the CLI passes the CPU count, the library default is 1.
        """
        todo = list(dict.fromkeys(r for r in requests if r not in self._bounds))
        if workers <= 1 or len(todo) < 2 or self._ops is None:
            return
        if "fork" not in multiprocessing.get_all_start_methods():
            return
        workers = min(workers, len(todo))
        context = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunk = max(1, len(todo) // (4 * workers))
                for key, bounds, curves in pool.map(_bounds_job, todo, chunksize=chunk):
                    self._bounds[key] = bounds
                    for mech, curve in curves.items():
                        curve.flags.writeable = False
                        self._curves.setdefault(mech, curve)
        except (OSError, RuntimeError) as err:  # no processes here: the serial path still works
            log.warning("parallel ε bounds unavailable (%s): computing them serially", err)

    # -- internals ----------------------------------------------------------------------------
    def _compute(self, history: History, delta: float, accountant: str) -> float:
        if self._ops is None:
            return epsilon_of(history, delta, accountant)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus's "optimal order is the largest alpha"
                if accountant == "rdp":
                    fast = self._rdp(history, delta)
                else:
                    fast = self._prv(history, delta)
        except Exception as err:  # an Opacus edge case: let Opacus itself decide
            log.debug("fast %s path failed for %s (%s): using epsilon_of", accountant, history, err)
            return epsilon_of(history, delta, accountant)
        if accountant not in self._checked:
            reference = epsilon_of(history, delta, accountant)
            self._checked.add(accountant)
            if not (fast == reference or math.isclose(fast, reference, rel_tol=1e-12)):
                log.warning(
                    "fast %s recomputation disagrees with Opacus (%r vs %r): using Opacus's "
                    "accountant directly for this audit (slower)", accountant, fast, reference,
                )
                self._ops = None
                return reference
        return fast

    def _curve(self, sigma: float, q: float) -> np.ndarray:
        """One-step RDP at Opacus's default orders: ``compute_rdp(..., steps=1)``."""
        key = (sigma, q)
        curve = self._curves.get(key)
        if curve is None:
            assert self._ops is not None
            curve = self._ops["compute_rdp"](  # type: ignore[operator]
                q=q, noise_multiplier=sigma, steps=1, orders=self._ops["alphas"]
            )
            curve.flags.writeable = False
            self._curves[key] = curve
        return curve

    def _rdp(self, history: History, delta: float) -> float:
        """``RDPAccountant(history).get_epsilon(delta)``, same operations in the same order."""
        assert self._ops is not None
        rdp = sum([self._curve(sigma, q) * steps for sigma, q, steps in history])
        eps, _ = self._ops["get_privacy_spent"](  # type: ignore[operator]
            orders=self._ops["alphas"], rdp=rdp, delta=delta
        )
        return float(eps)

    def _prv(self, history: History, delta: float) -> float:
        """``PRVAccountant(history).get_epsilon(delta)`` (its upper bound), step by step."""
        ops = self._ops
        assert ops is not None
        eps_error = PRV_EPS_ERROR
        delta_error = delta / 1000
        prvs = [ops["PRV"](q, sigma) for sigma, q, _ in history]  # type: ignore[operator]
        counts = [steps for _, _, steps in history]
        # PRVAccountant._get_domain / compute_safe_domain_size, with the cached RDP curves
        total = sum(counts)
        l_max = self._rdp(history, delta_error / 4)
        for sigma, q, _ in history:
            l_max = max(l_max, self._rdp(((sigma, q, 1),), delta_error / (8 * total)))
        size = max(l_max, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        domain = ops["Domain"].create_aligned(-size, size, mesh)  # type: ignore[attr-defined]
        truncated = [
            ops["TruncatedPRV"](prv, domain.t_min, domain.t_max)  # type: ignore[operator]
            for prv in prvs
        ]
        dprvs = [ops["discretize"](t, domain) for t in truncated]  # type: ignore[operator]
        composed = ops["compose"](dprvs=dprvs, num_self_compositions=counts)  # type: ignore[operator]
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
        return float(eps_upper)


def request_key(
    sigma: float, q: float, delta: float, totals: Sequence[int], slacks: Sequence[float]
) -> BoundRequest:
    return (
        float(sigma), float(q), float(delta), tuple(int(t) for t in totals),
        tuple(float(s) for s in slacks),
    )  # fmt: skip


_WORKER: Recomputer | None = None


def _bounds_job(request: BoundRequest) -> tuple[BoundRequest, list[float | None], dict]:
    """In a worker process: one request's bounds, and the RDP curve it computed on the way."""
    global _WORKER
    if _WORKER is None:
        _WORKER = Recomputer()
    sigma, q, delta, totals, slacks = request
    bounds = _WORKER.prv_bounds(sigma, q, delta, totals, slacks)
    curve = _WORKER._curves.get((sigma, q))
    return request, bounds, ({(sigma, q): curve} if curve is not None else {})


def _even_fast_len(size: int) -> int:
    """The smallest FFT-friendly even length ≥ ``size`` (Opacus needs even lengths)."""
    size = next_fast_len(size, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return size


def _bands(totals: Sequence[int], errors: Sequence[float], delta: float) -> list[list[int]]:
    """Group prefixes whose required mesh sizes are within 2× of each other.

    One grid per band: prefixes far from the budget tolerate a coarse grid, the last one
    near the budget may need one as fine as Opacus's own, and only it should pay for that.
    """
    log_term = math.log(12 / (delta / 1000)) / 2
    need = sorted(
        range(len(totals)), key=lambda k: errors[k] / math.sqrt(totals[k] * log_term)
    )
    bands: list[list[int]] = []
    finest = 0.0
    for k in need:
        mesh = errors[k] / math.sqrt(totals[k] * log_term)
        if bands and mesh <= 2 * finest:
            bands[-1].append(k)
        else:
            bands.append([k])
            finest = mesh
    return [sorted(b) for b in bands]
