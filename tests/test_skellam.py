"""The distributed Skellam mechanism (common/privacy/skellam.py): sampler, quantiser, accountant.

The accountant tests compare the closed-form bounds with Rényi divergences computed exactly
(numerically, on the integer grid) from Skellam PMFs, so a wrong formula or a wrong
parametrisation of μ fails them, and with Opacus's Gaussian accountant at large μ.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import ive, logsumexp

from common.privacy.opacus_internals import (
    RDP_DEFAULT_ALPHAS,
    compute_rdp,
    get_noise_multiplier,
    get_privacy_spent,
)
from common.privacy.skellam import (
    DEFAULT_SCALED_CLIP,
    SKELLAM_ORDERS,
    SkellamError,
    SkellamSpec,
    default_scale,
    epsilon,
    noise_multiplier_for,
    quantized_sum,
    skellam_noise,
    skellam_rdp,
    skellam_rdp_curve,
    subsampled_rdp,
)

D_MODEL = 61706  # LeNet-5's parameter count, the DP-SGD-like setting below
SCALE = DEFAULT_SCALED_CLIP  # s·C = 2^16 at C = 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("variance", [3.0, 7.5, 2.0**32 / 5])
def test_noise_mean_zero_and_variance_is_the_share(variance):
    n = 400_000
    x = skellam_noise((n,), variance, _gen(1)).to(torch.float64)
    assert skellam_noise((3,), variance).dtype == torch.int64
    mean, var = x.mean().item(), x.var().item()
    # Skellam(v/2, v/2): excess kurtosis 1/v, so Var(sample variance) ≈ (2v² + v) / n.
    mean_se = math.sqrt(variance / n)
    var_se = math.sqrt((2 * variance**2 + variance) / n)
    assert abs(mean) < 5 * mean_se, f"mean {mean} vs 0 (se {mean_se})"
    assert abs(var - variance) < 5 * var_se, f"variance {var} vs {variance} (se {var_se})"


def test_zero_variance_is_no_noise():
    assert torch.equal(skellam_noise((4, 5), 0.0), torch.zeros(4, 5, dtype=torch.int64))


def test_sum_of_client_shares_is_skellam_with_central_variance():
    """n honest clients each adding share_variance sum to exactly Skellam(μ/2, μ/2)."""
    spec = SkellamSpec(
        clip=1.0, scale=1.0, noise_multiplier=math.sqrt(3.0), dimension=1, honest_clients=4
    )
    mu = spec.central_variance
    assert mu == pytest.approx(3.0)
    gen, n = _gen(2), 300_000
    total = sum(skellam_noise((n,), spec.share_variance, gen) for _ in range(spec.honest_clients))
    values = total.numpy()
    ks = np.arange(-8, 9)
    pmf = stats.skellam.pmf(ks, mu / 2, mu / 2)
    observed = np.array([(values == k).sum() for k in ks], dtype=float)
    tails = stats.skellam.sf(8, mu / 2, mu / 2)  # each side, symmetric
    observed = np.append(observed, [(values < -8).sum(), (values > 8).sum()])
    expected = n * np.append(pmf, [tails, tails])
    chi2, p = stats.chisquare(observed, expected)
    assert p > 1e-4, f"chi-square {chi2:.1f}, p={p:.2e}: the summed shares are not Sk(μ/2, μ/2)"
    # The test can fail: the same draws do not fit a Skellam of variance 2μ or μ/2.
    for wrong in (2 * mu, mu / 2):
        wrong_expected = n * np.append(
            stats.skellam.pmf(ks, wrong / 2, wrong / 2),
            [stats.skellam.sf(8, wrong / 2, wrong / 2)] * 2,
        )
        assert stats.chisquare(observed, wrong_expected / wrong_expected.sum() * n)[1] < 1e-10


def test_noise_needs_a_cpu_generator_and_a_valid_variance():
    with pytest.raises(SkellamError, match="variance must be a finite number >= 0"):
        skellam_noise((3,), -1.0)
    with pytest.raises(SkellamError, match="variance must be"):
        skellam_noise((3,), math.nan)
    if torch.cuda.is_available():
        with pytest.raises(SkellamError, match="CPU generator"):
            skellam_noise((3,), 1.0, torch.Generator(device="cuda"))


# ---------------------------------------------------------------------------- the quantiser


def _clipped(grads: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus's per-sample clipping, independently of the module under test."""
    g = grads.to(torch.float64)
    norms = g.norm(dim=1, keepdim=True)
    return g * torch.clamp(clip / (norms + 1e-6), max=1.0)


def test_quantized_sum_is_unbiased():
    torch.manual_seed(0)
    dim, clip, scale = 6, 1.0, 100.3
    # rows inside, at and far outside the clip norm: clipping must leave the first alone exactly
    norms = torch.tensor([0.05, 0.3, 0.9, 0.99, 1.0, 2.0, 7.0, 40.0], dtype=torch.float64)
    rows = torch.randn(len(norms), dim, dtype=torch.float64)
    grads = (rows / rows.norm(dim=1, keepdim=True) * norms.unsqueeze(1)).to(torch.float32)
    batch = len(norms)
    target = scale * _clipped(grads, clip).sum(dim=0)
    se = math.sqrt(batch / 4 / 20_000)  # each row's rounding has variance ≤ 1/4 per coordinate
    # Round-to-nearest per row would be off by far more than the tolerance: the test can fail.
    nearest = (scale * _clipped(grads, clip)).round().sum(dim=0)
    assert (nearest - target).abs().max() > 10 * se
    draws = 20_000
    gen = _gen(3)
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(draws):
        out = quantized_sum(grads, clip, scale, gen)
        assert out.dtype == torch.int64
        total += out
    mean = total / draws
    assert torch.all((mean - target).abs() < 5 * se), f"mean {mean} vs s·Σclip(g) {target}"


def test_every_rounded_row_is_within_the_l2_sensitivity():
    torch.manual_seed(1)
    dim, clip = 400, 1.0
    gen = _gen(4)
    for scale in (3.0, 2.0**10, SCALE):
        spec = SkellamSpec(clip=clip, scale=scale, noise_multiplier=1.0, dimension=dim)
        worst = 0.0
        for i in range(200):
            # rows far outside the clip, at it, and within it; some with tiny coordinates
            row = torch.randn(1, dim) * (10.0 ** (i % 4 - 2)) * 50
            out = quantized_sum(row, clip, scale, gen).to(torch.float64)
            worst = max(worst, out.norm().item())
            assert out.abs().sum().item() <= spec.l1_sensitivity
        assert worst <= spec.l2_sensitivity
        # and the bound is not vacuous: clipped rows come close to s·C
        assert worst >= scale * clip * 0.99 - math.sqrt(dim)


def test_quantized_sum_rejects_bad_input():
    with pytest.raises(SkellamError, match=r"shape \[B, d\]"):
        quantized_sum(torch.zeros(5), 1.0, 2.0)
    with pytest.raises(SkellamError, match="NaN or inf"):
        quantized_sum(torch.tensor([[1.0, math.nan]]), 1.0, 2.0)
    with pytest.raises(SkellamError, match="clip must be > 0"):
        quantized_sum(torch.zeros(1, 2), 0.0, 2.0)


# ---------------------------------------------------------------------------- the accountant


def _skellam_logpmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P(k) for Sk(μ/2, μ/2), variance μ: P(k) = e^{-μ} I_|k|(μ) = ive(|k|, μ)."""
    with np.errstate(divide="ignore"):
        return np.log(ive(np.abs(k), mu))


def _renyi(logp: np.ndarray, logq: np.ndarray, alpha: int) -> float:
    """D_α(P‖Q) on the grid; terms where a PMF underflows are dropped (a lower bound)."""
    ok = np.isfinite(logp) & np.isfinite(logq)
    return float(logsumexp(alpha * logp[ok] + (1 - alpha) * logq[ok]) / (alpha - 1))


def _grid(mu: float) -> np.ndarray:
    half = int(mu + 40 * math.sqrt(mu) + 200)
    return np.arange(-half, half + 1)


def test_grid_pmf_is_scipy_skellam():
    k = np.arange(-30, 31)
    np.testing.assert_allclose(
        np.exp(_skellam_logpmf(k, 5.0)), stats.skellam.pmf(k, 2.5, 2.5), rtol=1e-9, atol=1e-300
    )


@pytest.mark.parametrize("mu", [2.0, 5.0, 20.0])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_skellam_rdp_bounds_the_exact_renyi_divergence(mu, shift):
    k = _grid(mu)
    logp, logq = _skellam_logpmf(k - shift, mu), _skellam_logpmf(k, mu)
    for alpha in range(2, 21):
        exact = _renyi(logp, logq, alpha)
        bound = skellam_rdp(alpha, shift, shift, mu)
        assert bound >= exact, f"μ={mu} Δ={shift} α={alpha}: bound {bound} < exact {exact}"
        if mu == 20.0 and alpha <= 5:
            # Tight at moderate μ: a factor-2 error in μ's parametrisation would show here.
            assert bound < 1.5 * exact, f"μ={mu} Δ={shift} α={alpha}: {bound} vs {exact}"


@pytest.mark.parametrize(("q", "mu"), [(0.1, 5.0), (0.5, 2.0), (0.05, 20.0), (0.01, 3.0)])
@pytest.mark.parametrize("shift", [1, 3])
def test_subsampled_bound_covers_the_exact_mixture_divergence(q, mu, shift):
    k = _grid(mu)
    logp = _skellam_logpmf(k, mu)
    mixture = np.logaddexp(math.log1p(-q) + logp, math.log(q) + _skellam_logpmf(k - shift, mu))
    for alpha in (2, 3, 4, 5, 8, 12, 20):
        bound = subsampled_rdp(alpha, q, lambda a: skellam_rdp(a, shift, shift, mu))
        removed, added = _renyi(mixture, logp, alpha), _renyi(logp, mixture, alpha)
        assert bound >= removed, f"q={q} μ={mu} Δ={shift} α={alpha}: {bound} < {removed}"
        assert bound >= added, f"q={q} μ={mu} Δ={shift} α={alpha}: {bound} < {added}"
        assert bound <= skellam_rdp(alpha, shift, shift, mu)
    # Subsampling amplifies: at small q the bound is far below the unsampled one.
    if q <= 0.05:
        assert subsampled_rdp(2, q, lambda a: skellam_rdp(a, shift, shift, mu)) < 0.2 * skellam_rdp(
            2, shift, shift, mu
        )


def test_subsampled_bound_is_zhu_wang_theorem_6_as_written():
    """Term by term in plain floats at small orders (no log space), against the log-space code."""

    def eps(ell: int) -> float:
        return skellam_rdp(ell, 2, 2, 6.0)

    for q in (0.01, 0.2, 0.7):
        for alpha in (2, 3, 4, 7, 12):
            total = (1 - q) ** (alpha - 1) * (alpha * q - q + 1)
            total += math.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2) * math.exp(eps(2))
            total += 3 * sum(
                math.comb(alpha, ell)
                * (1 - q) ** (alpha - ell)
                * q**ell
                * math.exp((ell - 1) * eps(ell))
                for ell in range(3, alpha + 1)
            )
            expected = min(math.log(total) / (alpha - 1), eps(alpha))
            assert subsampled_rdp(alpha, q, eps) == pytest.approx(expected, rel=1e-12)


def test_subsampled_edge_rates():
    fn = lambda a: skellam_rdp(a, 1, 1, 4.0)  # noqa: E731
    assert subsampled_rdp(7, 0.0, fn) == 0.0
    assert subsampled_rdp(7, 1.0, fn) == fn(7)
    # large orders stay finite (log space)
    assert math.isfinite(subsampled_rdp(1024, 0.3, lambda a: skellam_rdp(a, 1, 1, 100.0)))


def _opacus_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_DEFAULT_ALPHAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_privacy_spent(orders=RDP_DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])


@pytest.mark.parametrize(("q", "steps", "sigma"), [(0.01, 1000, 1.0), (0.04, 300, None)])
def test_large_mu_skellam_epsilon_is_at_least_the_gaussian(q, steps, sigma):
    delta = 1e-5
    if sigma is None:  # Opacus's σ for ε = 3
        sigma = get_noise_multiplier(
            target_epsilon=3.0, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"
        )
    spec = SkellamSpec(clip=1.0, scale=SCALE, noise_multiplier=sigma, dimension=D_MODEL)
    ours = epsilon(spec, q, steps, delta)
    gauss = _opacus_epsilon(q, sigma, steps, delta)
    message = f"Skellam ε {ours:.4f} vs Opacus Gaussian ε {gauss:.4f} (ratio {ours / gauss:.4f})"
    assert ours >= gauss * (1 - 1e-6), message
    # Zhu–Wang's general bound (its factor 3) costs ~16–27% here, rounding's √d under 1%.
    assert ours <= 1.35 * gauss, message


def test_curve_composes_additively_and_matches_epsilon():
    spec = SkellamSpec(clip=1.0, scale=SCALE, noise_multiplier=1.1, dimension=D_MODEL)
    one = skellam_rdp_curve(spec, 0.02, 1)
    many = skellam_rdp_curve(spec, 0.02, 250)
    assert one.shape == (len(SKELLAM_ORDERS),)
    np.testing.assert_allclose(many, 250 * one)
    assert np.all(np.diff(one) >= 0)  # RDP is nondecreasing in the order
    eps_direct, _ = get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=many, delta=1e-5)
    assert epsilon(spec, 0.02, 250, 1e-5) == pytest.approx(float(eps_direct))
    # composing with Gaussian history over the same orders: more history, more ε
    gauss = compute_rdp(q=0.02, noise_multiplier=1.1, steps=100, orders=list(SKELLAM_ORDERS))
    mixed, _ = get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=many + gauss, delta=1e-5)
    assert mixed > eps_direct
    assert skellam_rdp_curve(spec, 0.02, 0).sum() == 0.0
    assert epsilon(spec, 0.02, 0, 1e-5) == 0.0


def test_calibration_returns_the_smallest_sufficient_sigma():
    target, delta, q, steps = 3.0, 1e-5, 0.04, 300
    sigma = noise_multiplier_for(target, delta, q, steps, 1.0, SCALE, D_MODEL)

    def eps(s: float) -> float:
        return epsilon(SkellamSpec(1.0, SCALE, s, D_MODEL), q, steps, delta)

    assert eps(sigma) <= target
    assert eps(0.99 * sigma) > target
    # ...and it is more noise than Opacus needs for the Gaussian, never less
    gauss = get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert sigma > gauss


def test_calibration_at_small_scale_pays_for_rounding():
    """With a small s, the √d rounding inflation dominates Δ2: much more σ is needed."""
    large = noise_multiplier_for(3.0, 1e-5, 0.04, 100, 1.0, SCALE, 1000)
    small = noise_multiplier_for(3.0, 1e-5, 0.04, 100, 1.0, 8.0, 1000)
    assert small > 2 * large


# ---------------------------------------------------------------------------- spec and scale


def test_spec_derived_quantities():
    spec = SkellamSpec(clip=0.5, scale=4.0, noise_multiplier=1.5, dimension=100, honest_clients=3)
    assert spec.central_variance == pytest.approx((1.5 * 4.0 * 0.5) ** 2)
    assert spec.share_variance == pytest.approx(spec.central_variance / 3)
    assert spec.l2_sensitivity == pytest.approx(2.0 + 10.0)
    assert spec.l1_sensitivity == pytest.approx(min(10.0 * 12.0, 144.0))
    # Δ2 = s·C + √d > √d, so √d·Δ2 < Δ2² always: the integer bound Δ2² never binds here
    for scale in (0.01, 1.0, SCALE):
        other = SkellamSpec(clip=1.0, scale=scale, noise_multiplier=1.0, dimension=10_000)
        assert other.l1_sensitivity == pytest.approx(100.0 * other.l2_sensitivity)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": 0.0}, "clip must be > 0"),
        ({"clip": math.inf}, "clip must be a finite number"),
        ({"scale": -1.0}, r"scale must be > 0, got -1.0: use default_scale"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be a finite number >= 0"),
        ({"dimension": 0}, "dimension must be an integer >= 1"),
        ({"dimension": 2.5}, "dimension must be an integer >= 1"),
        ({"honest_clients": 0}, "honest_clients must be an integer >= 1"),
    ],
)
def test_spec_validation_names_problem_and_fix(kwargs, message):
    args = {
        "clip": 1.0,
        "scale": 2.0,
        "noise_multiplier": 1.0,
        "dimension": 3,
        "honest_clients": 1,
    } | kwargs
    with pytest.raises(SkellamError, match=message) as info:
        SkellamSpec(**args)
    text = str(info.value)
    assert "\n" not in text and ": " in text


def test_spec_is_frozen():
    spec = SkellamSpec(1.0, 2.0, 1.0, 3)
    with pytest.raises(AttributeError):
        spec.clip = 2.0  # type: ignore[misc]


def test_accountant_validation():
    spec = SkellamSpec(1.0, 2.0, 1.0, 3)
    with pytest.raises(SkellamError, match="integers >= 2"):
        skellam_rdp(2.5, 1, 1, 1.0)
    with pytest.raises(SkellamError, match="integers >= 2"):
        skellam_rdp_curve(spec, 0.1, 10, orders=[1.5, 2])
    with pytest.raises(SkellamError, match=r"q must be in \[0, 1\]"):
        epsilon(spec, 1.5, 10, 1e-5)
    with pytest.raises(SkellamError, match=r"delta must be in \(0, 1\)"):
        epsilon(spec, 0.1, 10, 0.0)
    with pytest.raises(SkellamError, match="steps must be an integer >= 0"):
        skellam_rdp_curve(spec, 0.1, -1)
    with pytest.raises(SkellamError, match="target_epsilon must be > 0"):
        noise_multiplier_for(0.0, 1e-5, 0.1, 10, 1.0, 2.0, 3)
    assert skellam_rdp(3, 1, 1, 0.0) == math.inf
    assert epsilon(SkellamSpec(1.0, 2.0, 0.0, 3), 0.1, 10, 1e-5) == math.inf


def test_default_scale():
    assert default_scale(1.0, noise_multiplier=1.0) == SCALE
    assert default_scale(0.25, noise_multiplier=1.0) * 0.25 == SCALE
    # 32 bits: 2^31 / (2^16 + 1) ≈ 32767 records of headroom, minus the noise tail
    default_scale(1.0, max_records_per_round=32_000, noise_multiplier=1.0)
    with pytest.raises(SkellamError, match=r"exceeds the 32-bit signed ring.*lower max_records"):
        default_scale(1.0, max_records_per_round=40_000, noise_multiplier=1.0)
    with pytest.raises(SkellamError, match="exceeds the 32-bit signed ring"):
        default_scale(
            1.0,
            max_records_per_round=32_000,
            noise_multiplier=50.0,
            contributing_clients=100,
            honest_clients=10,
        )
    with pytest.raises(SkellamError, match="exceeds the 24-bit"):
        default_scale(1.0, bits=24, noise_multiplier=1.0)
    with pytest.raises(SkellamError, match=r"honest_clients .* exceeds contributing_clients"):
        default_scale(1.0, noise_multiplier=1.0, contributing_clients=2, honest_clients=3)
