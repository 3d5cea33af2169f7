"""The distributed Skellam mechanism and its RDP accountant: record-level DP under SecAgg.

One FedSGD round under secure aggregation, as this module sees it: each client Poisson-samples
its records (rate ``q``), computes per-example gradients ``grads`` [B, d], and calls
:func:`quantized_sum` (clip each row to L2 norm ``C`` as Opacus does, multiply by ``scale`` s,
round each coordinate stochastically and unbiasedly to an integer, sum the rows) and adds
:func:`skellam_noise` with variance :attr:`SkellamSpec.share_variance`. The server learns only
the sum over clients (SecAgg) and divides it by s.

Privacy argument. Adding or removing one record changes one row of one client. After clipping,
scaling and rounding, that row is an integer vector with L2 norm at most
``Δ2 = s·C + √d`` (deterministically: rounding moves each coordinate by less than 1) and L1 norm
at most ``Δ1 = min(√d·Δ2, Δ2²)`` (Cauchy–Schwarz, and ``|x| ≤ x²`` for integers). When at least
``honest_clients`` clients really add their shares, the released sum carries Skellam noise of
per-coordinate variance ``μ = (σ·s·C)²`` from them alone (independent symmetric Skellams sum to a
symmetric Skellam, variances add); the other clients' shares, which colluders could subtract,
are post-processing at best, so the accountant credits exactly μ. That is the Skellam mechanism with
sensitivity (Δ1, Δ2) applied to a Poisson-subsampled sum, accounted here by

- :func:`skellam_rdp`: Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
  Federated Learning" (NeurIPS 2021), the multidimensional RDP bound (Theorem 3.5 and its
  corollary), in the integer domain with μ the variance of the total noise;
- :func:`subsampled_rdp`: Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy" (ICML
  2019), Theorem 6, the general upper bound for integer orders, min'ed with the unsampled RDP;
- additive composition over steps and Opacus's RDP → (ε, δ) conversion
  (``opacus.accountants.analysis.rdp.get_privacy_spent``, Balle et al. 2020), so that ε here
  and ε from fedvault's Gaussian DP-SGD accounting mean the same thing.

Only integer orders :data:`SKELLAM_ORDERS` are used: both bounds above are stated for integers.
The noise std σ·C in gradient units (``noise_multiplier`` σ) is what :func:`noise_multiplier_for`
calibrates, as Opacus's ``noise_multiplier`` for the Gaussian mechanism.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaln, logsumexp

from common.privacy.opacus_internals import get_privacy_spent

logger = logging.getLogger("fedvault.privacy")

# Integer orders only (the Skellam and Zhu–Wang bounds need them): 2..256 covers ε from about
# 0.1 up; the few larger ones serve very small ε. The integrator composes Gaussian history with
# opacus compute_rdp(..., orders=SKELLAM_ORDERS), which accepts any orders.
SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 512, 768, 1024)

# s·C for default_scale: 16 bits of resolution for a clipped row's largest coordinate.
DEFAULT_SCALED_CLIP = 2.0**16
# Tail allowance for the noise in the ring: P(|Skellam| > 12 std) is below 1e-30 per coordinate.
NOISE_TAIL_STDS = 12.0


class SkellamError(ValueError):
    """Invalid Skellam parameters or inputs; the message names the problem and the fix."""


def _positive_finite(name: str, value: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SkellamError(f"{name} must be a finite number, got {value!r}: {fix}")
    if value <= 0:
        raise SkellamError(f"{name} must be > 0, got {value!r}: {fix}")


def _positive_int(name: str, value: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SkellamError(f"{name} must be an integer >= 1, got {value!r}: {fix}")


@dataclass(frozen=True)
class SkellamSpec:
    """One round's Skellam mechanism: clip C, scale s, noise multiplier σ, dimension d, and the
    number of clients assumed honest (those whose noise shares the guarantee relies on).

    The central noise has std σ·C in gradient units, i.e. variance μ = (σ·s·C)² in the integer
    domain; each client adds μ / honest_clients, so any ``honest_clients`` honest clients
    together reach μ whatever the others do.
    """

    clip: float
    scale: float
    noise_multiplier: float
    dimension: int
    honest_clients: int = 1

    def __post_init__(self) -> None:
        _positive_finite("clip", self.clip, "pass the per-example L2 clipping norm C, e.g. 1.0")
        _positive_finite("scale", self.scale, "use default_scale(clip, ...) or a positive s")
        sigma = self.noise_multiplier
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, int | float)
            or not (math.isfinite(sigma) and sigma >= 0)
        ):
            raise SkellamError(
                f"noise_multiplier must be a finite number >= 0, got {sigma!r}: "
                "use noise_multiplier_for(target_epsilon, ...)"
            )
        _positive_int("dimension", self.dimension, "pass the number of model parameters d")
        _positive_int(
            "honest_clients",
            self.honest_clients,
            "pass how many clients per round are trusted to add their noise share (>= 1)",
        )

    @property
    def central_variance(self) -> float:
        """μ: per-coordinate variance of the total noise in the integer domain, (σ·s·C)²."""
        return (self.noise_multiplier * self.scale * self.clip) ** 2

    @property
    def share_variance(self) -> float:
        """μ / honest_clients: the variance ONE client's share adds per coordinate."""
        return self.central_variance / self.honest_clients

    @property
    def l2_sensitivity(self) -> float:
        """Δ2 = s·C + √d: a rounded row's L2 norm bound (each coordinate moves by < 1)."""
        return self.scale * self.clip + math.sqrt(self.dimension)

    @property
    def l1_sensitivity(self) -> float:
        """Δ1 = min(√d·Δ2, Δ2²): Cauchy–Schwarz, and Σ|x| ≤ Σx² ≤ Δ2² for integer vectors."""
        l2 = self.l2_sensitivity
        return min(math.sqrt(self.dimension) * l2, l2 * l2)


def default_scale(
    clip: float,
    bits: int = 32,
    max_records_per_round: int = 4096,
    *,
    noise_multiplier: float,
    contributing_clients: int = 1,
    honest_clients: int = 1,
) -> float:
    """The scale s with s·C = 2^16, checked to fit the signed ``bits``-bit SecAgg ring.

    Why 2^16: it gives a clipped row's largest coordinate 16 bits of resolution, so the L2
    inflation from rounding (√d on top of s·C; 248 for d = 61706, +0.4%) costs well under 1% of
    ε, while leaving 15 bits of a 32-bit ring for summing records and noise.

    The check is on the worst case per coordinate of the sum the server decodes: every one of
    ``max_records_per_round`` records (over all clients of the round) contributes less than
    s·C + 1 in absolute value, plus 12 standard deviations of the noise actually summed: each of
    ``contributing_clients`` adds μ/honest_clients, so its variance is
    μ·contributing/honest with μ = (σ·s·C)². It must stay within 2^(bits−1) − 1, else the sum
    wraps around the ring; raising is the fix-it-here signal (fewer records per round, more
    bits, or a smaller s chosen by hand).
    """
    _positive_finite("clip", clip, "pass the per-example L2 clipping norm C, e.g. 1.0")
    _positive_int("bits", bits, "pass the SecAgg ring's bit width, e.g. 32")
    _positive_int("max_records_per_round", max_records_per_round, "bound the round's records")
    _positive_int("contributing_clients", contributing_clients, "pass the clients per round")
    _positive_int("honest_clients", honest_clients, "pass the clients assumed honest (>= 1)")
    if honest_clients > contributing_clients:
        raise SkellamError(
            f"honest_clients ({honest_clients}) exceeds contributing_clients "
            f"({contributing_clients}): at most every client of the round can be honest"
        )
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise SkellamError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}: "
            "pass the σ the round will use"
        )
    scale = DEFAULT_SCALED_CLIP / clip
    noise_std = (
        noise_multiplier * DEFAULT_SCALED_CLIP * math.sqrt(contributing_clients / honest_clients)
    )
    worst = max_records_per_round * (DEFAULT_SCALED_CLIP + 1) + NOISE_TAIL_STDS * noise_std
    limit = 2.0 ** (bits - 1) - 1
    if worst > limit:
        raise SkellamError(
            f"with s·C = 2^16 the worst-case |sum| per coordinate ({worst:.4g}) exceeds the "
            f"{bits}-bit signed ring ({limit:.4g}): lower max_records_per_round "
            f"({max_records_per_round}) or raise bits"
        )
    return scale


def quantized_sum(
    grads: torch.Tensor, clip: float, scale: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Clip each row of ``grads`` [B, d] to L2 norm ``clip``, scale by ``scale``, round each
    coordinate stochastically (unbiased, independent), and return the int64 sum over rows [d].

    Clipping is Opacus's: factor min(1, C / (‖g‖ + 1e-6)). Everything runs in float64: at
    s·C = 2^16 a float32 coordinate has a resolution of 2^-8, which would bias the rounding
    probabilities; in float64 it is 2^-37, and the rounded values and their row sums are exact
    integers (all below 2^53). Each rounded row's squared norm is checked, exactly, against
    Δ2² = (s·C + √d)², the sensitivity the accountant uses. ``generator`` must live on
    ``grads.device``.
    """
    _positive_finite("clip", clip, "pass the per-example L2 clipping norm C, e.g. 1.0")
    _positive_finite("scale", scale, "use default_scale(clip, ...) or a positive s")
    if grads.ndim != 2:
        raise SkellamError(
            f"grads must be per-example gradients of shape [B, d], got shape {tuple(grads.shape)}"
            ": flatten each example's gradient into one row"
        )
    g = grads.detach().to(torch.float64)
    if not torch.isfinite(g).all():
        raise SkellamError("grads contain NaN or inf: fix the model/loss before clipping")
    batch, dim = g.shape
    if batch * (scale * clip + 1) >= 2.0**53:
        raise SkellamError(
            f"{batch} rows at s·C = {scale * clip:.4g} exceed float64's exact integer range: "
            "lower the scale"
        )
    norms = torch.linalg.vector_norm(g, dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    x = g * (factor * scale).unsqueeze(1)
    low = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    rounded = low + (u < (x - low)).to(torch.float64)
    bound = (scale * clip + math.sqrt(dim)) ** 2
    if batch and (rounded * rounded).sum(dim=1).max().item() > bound:
        raise SkellamError(
            "a rounded row exceeds the L2 sensitivity s·C + √d: this is a bug in quantized_sum"
        )
    return rounded.sum(dim=0).to(torch.int64)


def skellam_noise(
    shape: Sequence[int] | torch.Size, variance: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Symmetric Skellam noise of per-coordinate ``variance``: Poisson(v/2) − Poisson(v/2), int64.

    Sampled on the CPU, always (``generator`` must be a CPU generator; move the result to the
    device afterwards). torch's CPU Poisson sampler is exact (Hörmann's transformed rejection,
    int64 results, in double), which the privacy argument needs; the CUDA one goes through
    cuRAND, which to our knowledge uses a normal approximation for large rates and returns
    32-bit unsigned counts, so it would not be Skellam at the rates used here (~2^31).
    Rates are float64: at v/2 ~ 2^31 a float32 rate would not even be representable exactly.
    Variance 0 gives zeros (no noise).
    """
    if not (math.isfinite(variance) and variance >= 0):
        raise SkellamError(
            f"variance must be a finite number >= 0, got {variance!r}: "
            "pass SkellamSpec.share_variance"
        )
    if generator is not None and generator.device.type != "cpu":
        raise SkellamError(
            f"skellam_noise needs a CPU generator, got one on {generator.device}: "
            "sample on the CPU and move the noise to the device"
        )
    if variance == 0:
        return torch.zeros(tuple(shape), dtype=torch.int64)
    rates = torch.full(tuple(shape), variance / 2.0, dtype=torch.float64)
    first = torch.poisson(rates, generator=generator).to(torch.int64)
    second = torch.poisson(rates, generator=generator).to(torch.int64)
    return first - second


def _check_orders(alpha: float | np.ndarray) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    if not (np.all(a == np.round(a)) and np.all(a >= 2)):
        raise SkellamError(
            f"RDP orders must be integers >= 2, got {alpha!r}: use SKELLAM_ORDERS "
            "(the Skellam and Zhu–Wang bounds hold for integer orders)"
        )
    return a


def skellam_rdp(alpha: float | np.ndarray, l1: float, l2: float, mu: float) -> float | np.ndarray:
    """RDP ε(α) of the multidimensional Skellam mechanism, integer domain.

    Agarwal, Kairouz, Liu (NeurIPS 2021), Theorem 3.5 / its multidimensional corollary, written
    with μ = the per-coordinate variance of the total noise (symmetric Skellam Sk(μ/2, μ/2)):

        ε(α) ≤ α·Δ2²/(2μ) + min( ((2α−1)·Δ2² + 6·Δ1) / (4μ²),  3·Δ1 / (2μ) ).

    This is google-research/federated distributed_dp/accounting_utils.py ``_skellam_rdp`` with
    its scale factor set to 1 (there sensitivities and variance are in gradient units: Δ/s and
    μ/s²; substituting gives the same expression). tests/test_skellam.py checks it against the
    exact Rényi divergence of 1-D Skellam distributions, which also pins the parametrisation.
    μ = 0 gives ∞. Vectorised over ``alpha``.
    """
    a = _check_orders(alpha)
    if mu <= 0:
        out = np.full_like(a, np.inf)
    else:
        out = a * l2**2 / (2 * mu) + np.minimum(
            ((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu)
        )
    return float(out) if out.ndim == 0 else out


def _log_comb(n: float, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _subsampled_from_base(alpha: int, q: float, base: np.ndarray) -> float:
    """Zhu–Wang Theorem 6 at integer ``alpha``; ``base[l]`` is the unsampled ε(l), l = 0..alpha.

    Log space throughout, so (l−1)·ε(l) in the hundreds and α up to 1024 do not overflow.
    """
    unsampled = float(base[alpha])
    if q == 0:
        return 0.0
    if q == 1:
        return unsampled
    log1mq, logq = math.log1p(-q), math.log(q)
    ells = np.arange(3, alpha + 1, dtype=np.float64)
    terms = [
        (alpha - 1) * log1mq + math.log(alpha * q - q + 1),
        float(_log_comb(alpha, np.float64(2.0))) + 2 * logq + (alpha - 2) * log1mq + base[2],
    ]
    if alpha >= 3:
        rest = (
            math.log(3.0)
            + _log_comb(alpha, ells)
            + (alpha - ells) * log1mq
            + ells * logq
            + (ells - 1) * base[3 : alpha + 1]
        )
        terms.extend(rest.tolist())
    sampled = float(logsumexp(np.asarray(terms))) / (alpha - 1)
    return min(sampled, unsampled)


def subsampled_rdp(alpha: int, q: float, rdp_fn: Callable[[int], float]) -> float:
    """RDP at integer order ``alpha`` ≥ 2 of a mechanism with RDP curve ``rdp_fn`` run on a
    Poisson subsample of rate ``q``.

    Zhu & Wang (ICML 2019), Theorem 6 (general upper bound, any mechanism, add/remove one):

        ε_q(α) ≤ 1/(α−1) · log( (1−q)^(α−1)·(αq − q + 1) + C(α,2)·q²·(1−q)^(α−2)·e^{ε(2)}
                                + 3·Σ_{l=3..α} C(α,l)·(1−q)^(α−l)·q^l·e^{(l−1)·ε(l)} ),

    and never more than the unsampled ε(α). It is looser than Opacus's Gaussian-specific
    bound (the factor 3), which is the price of not assuming Gaussian noise.
    """
    a = int(_check_orders(alpha))
    if not (0 <= q <= 1):
        raise SkellamError(f"sampling rate q must be in [0, 1], got {q!r}: pass the Poisson rate")
    base = np.full(a + 1, np.nan)
    base[2:] = [rdp_fn(ell) for ell in range(2, a + 1)]
    return _subsampled_from_base(a, q, base)


def skellam_rdp_curve(
    spec: SkellamSpec, q: float, steps: int, orders: Sequence[int] = SKELLAM_ORDERS
) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled (rate ``q``) rounds of ``spec``, over ``orders``.

    RDP composes additively at each order, so the integrator adds this curve to the Gaussian
    DP-SGD history's curve computed over the SAME orders (opacus ``compute_rdp``) and converts
    the total once with ``get_privacy_spent``.
    """
    if not (0 <= q <= 1):
        raise SkellamError(f"sampling rate q must be in [0, 1], got {q!r}: pass the Poisson rate")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SkellamError(f"steps must be an integer >= 0, got {steps!r}: pass the rounds run")
    ords = _check_orders(np.asarray(orders)).astype(np.int64)
    if steps == 0:
        return np.zeros(len(ords))
    top = int(ords.max())
    base = np.full(top + 1, np.nan)
    base[2:] = skellam_rdp(
        np.arange(2, top + 1), spec.l1_sensitivity, spec.l2_sensitivity, spec.central_variance
    )
    per_step = np.array([_subsampled_from_base(int(a), q, base) for a in ords])
    return per_step * steps


def epsilon(
    spec: SkellamSpec,
    q: float,
    steps: int,
    delta: float,
    orders: Sequence[int] = SKELLAM_ORDERS,
) -> float:
    """(ε, δ) of ``steps`` subsampled Skellam rounds, via Opacus's RDP conversion."""
    if not (0 < delta < 1):
        raise SkellamError(f"delta must be in (0, 1), got {delta!r}: e.g. 1e-5")
    if steps == 0 or q == 0:
        return 0.0
    rdp = skellam_rdp_curve(spec, q, steps, orders)
    if not np.isfinite(rdp).any():
        return math.inf
    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    clip: float,
    scale: float,
    dim: int,
    *,
    rtol: float = 1e-4,
) -> float:
    """The smallest σ (central noise std σ·C in gradient units, μ = (σ·s·C)²) whose ε ≤ target.

    Bisection on σ (ε decreases with σ) down to a relative bracket width ``rtol``; the upper end
    is returned, so the σ handed back is one whose ε was computed and is ≤ target (rounded up,
    never down). The number of honest clients does not enter: it only splits μ into shares.
    """
    _positive_finite("target_epsilon", target_epsilon, "pass the ε budget, e.g. 3.0")
    if not (0 < rtol < 1):
        raise SkellamError(f"rtol must be in (0, 1), got {rtol!r}: e.g. 1e-4")

    def eps_at(sigma: float) -> float:
        spec = SkellamSpec(clip=clip, scale=scale, noise_multiplier=sigma, dimension=dim)
        return epsilon(spec, q, steps, delta)

    hi = 1.0
    while eps_at(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise SkellamError(
                f"no σ ≤ 1e6 reaches ε ≤ {target_epsilon} (q={q}, steps={steps}, "
                f"scale={scale}, dim={dim}): raise the target or the scale, or run fewer steps"
            )
    lo = hi / 2
    while eps_at(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-6:
            return hi
    while (hi - lo) / hi > rtol:
        mid = (lo + hi) / 2
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    logger.debug(
        "Skellam σ=%.6g for ε≤%g (δ=%g, q=%g, steps=%d, s=%g, d=%d)",
        hi,
        target_epsilon,
        delta,
        q,
        steps,
        scale,
        dim,
    )
    return hi
