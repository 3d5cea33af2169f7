"""Every piece of Opacus that fedvault uses beyond ``PrivacyEngine.make_private``, in one place.

These are Opacus internals or semi-public helpers: module paths, class-level registries and
constructors that Opacus may change in a minor release without a deprecation. They were
verified on the range in :data:`VERIFIED_RANGE` (pyproject's ``opacus`` requirement;
tests/test_opacus_internals.py checks both agree and that every name below resolves), and
importing this module refuses any other installed Opacus with one line naming the fix.

Why each is needed:

- ``GRAD_SAMPLERS`` (``GradSampleModule.GRAD_SAMPLERS``) and ``NORM_SAMPLERS``
  (``GradSampleModuleFastGradientClipping.NORM_SAMPLERS``, from the non-exported module
  ``opacus.grad_sample.grad_sample_module_fast_gradient_clipping``): the per-layer-type
  registries of per-sample gradient and ghost-norm samplers, called as
  ``sampler(module, activations, backprops) -> {param: tensor}``. client/clipping.py's
  book-keeping clipping calls them directly on the activations and backprops of one backward
  pass, instead of letting Opacus's hooks run a second pass.
- ``DPOptimizerFastGradientClipping``: built by hand in client/training.py (as
  ``make_private`` would build it for ghost clipping) around the clipped sum that
  book-keeping puts in ``p.grad``; it adds the noise and calls the accountant's step hook.
- ``UniformWithReplacementSampler`` (``opacus.utils.uniform_sampler``): Poisson sampling of
  batches for a loader client/training.py builds itself.
- ``get_noise_multiplier`` (``opacus.accountants.utils``): the σ search for a target ε
  (common/privacy/accounting.py).
- The accountants' analysis functions, for the audit's fast ε recomputation
  (common/audit/recompute.py), which reuses one privacy curve across many histories instead
  of building an accountant per history: ``RDP_DEFAULT_ALPHAS``
  (``RDPAccountant.DEFAULT_ALPHAS``), ``compute_rdp`` and ``get_privacy_spent``
  (``opacus.accountants.analysis.rdp``), and from ``opacus.accountants.analysis.prv``
  ``Domain``, ``PoissonSubsampledGaussianPRV``, ``TruncatedPrivacyRandomVariable``,
  ``compose_heterogeneous``, ``discretize`` and ``DiscretePRV`` (``...prv.prvs``).

Relied on but not importable (attributes and methods, covered by the tests of their users):
an accountant's ``history`` list of ``(noise_multiplier, sample_rate, steps)``, set directly
to compose a replayed history (common/privacy/accounting.py), and
``accountant.get_optimizer_hook_fn`` / ``DPOptimizer.attach_step_hook`` (client/training.py).

Importing this module imports Opacus (and torch): import it where those are needed anyway,
or inside the function that needs it.
"""

from __future__ import annotations

import re

import opacus

# pyproject.toml's requirement: opacus>=1.6,<1.7 (as (major, minor) bounds, upper exclusive)
VERIFIED_RANGE = ((1, 6), (1, 7))
REQUIREMENT = "opacus>={}.{},<{}.{}".format(*VERIFIED_RANGE[0], *VERIFIED_RANGE[1])


class OpacusVersionError(ImportError):
    """The installed Opacus is outside the range these internals were verified on."""


def check_version(version: str) -> None:
    """Raise :class:`OpacusVersionError` unless ``version`` is within :data:`VERIFIED_RANGE`."""
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = VERIFIED_RANGE
    if match is None or not low <= (int(match[1]), int(match[2])) < high:
        raise OpacusVersionError(
            f"Opacus {version} is installed but fedvault's use of its internals was verified "
            f"on {REQUIREMENT}: pip install '{REQUIREMENT}'"
        )


check_version(opacus.__version__)

# After the check: on another Opacus these imports may fail with a less helpful error.
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.analysis.prv import (  # noqa: E402
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.prv.prvs import DiscretePRV  # noqa: E402
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.grad_sample import GradSampleModule  # noqa: E402
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (  # noqa: E402
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

GRAD_SAMPLERS = GradSampleModule.GRAD_SAMPLERS
NORM_SAMPLERS = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
RDP_DEFAULT_ALPHAS = RDPAccountant.DEFAULT_ALPHAS

__all__ = [
    "GRAD_SAMPLERS",
    "NORM_SAMPLERS",
    "RDP_DEFAULT_ALPHAS",
    "REQUIREMENT",
    "VERIFIED_RANGE",
    "DPOptimizerFastGradientClipping",
    "DiscretePRV",
    "Domain",
    "OpacusVersionError",
    "PoissonSubsampledGaussianPRV",
    "TruncatedPrivacyRandomVariable",
    "UniformWithReplacementSampler",
    "check_version",
    "compose_heterogeneous",
    "compute_rdp",
    "discretize",
    "get_noise_multiplier",
    "get_privacy_spent",
]
