"""A data holder's privacy policy: what its data may pay, decided by the holder alone.

The run config is written by the server's operator; a client that took its budget, noise or
DP switch from it would let the party it protects against decide its guarantee. So each
client reads its own policy (a TOML file beside its key dir, or node config ``policy``) and
treats the run config as a *request*: a run may ask for less (fewer ε this run, more noise,
sealing), never for more. Whatever the policy does not allow is refused before training.

``policy.toml`` (every key optional; the defaults are the safe side)::

    dataset-id = "hospital-a-2026"      # names the data set the lifetime budget covers
    lifetime-epsilon = 8.0              # ε this data set may ever spend, all runs together
    delta = 1e-5                        # the δ every ε of this data set is stated at
    accountant = "prv"                  # how the holder composes its spend (prv or rdp)
    min-noise-multiplier = 0.5          # refuse a run whose σ is below this (0 = any σ)
    max-round-epsilon = 2.0             # refuse a round that would add more (inf = no cap)
    require-dp = true                   # refuse runs with dp = false
    require-sealing = true              # refuse unsealed / unsigned messages (needs keys)
    declared-examples = 480             # the data set size the holder makes public
    release-evaluation = false          # answer federated-evaluation requests (see README)

``declared-examples`` is the only size that leaves the client: it fixes q = 1/⌈n/B⌉, the
steps and the FedAvg weight, so the true size (which differs between neighbouring data sets)
never does. Without it the client declares its true size and logs that it does so.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import kebab_fields
from common.privacy import ACCOUNTANTS

POLICY_FILE = "policy.toml"


class PolicyError(ValueError):
    """A policy file that cannot be read or says something impossible."""


class PolicyRefusal(RuntimeError):
    """A run asks for more than the holder's policy allows; the client does not train."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """One holder's rules for one data set (see the module docstring for each key)."""

    dataset_id: str = "default"
    lifetime_epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "prv"
    min_noise_multiplier: float = 0.0
    max_round_epsilon: float = math.inf
    require_dp: bool = True
    require_sealing: bool = True
    declared_examples: int = 0  # 0 = declare the true size
    release_evaluation: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.dataset_id or any(c in self.dataset_id for c in "/\\\0"):
            problems.append(f"dataset-id {self.dataset_id!r} must be a non-empty name")
        if not (self.lifetime_epsilon > 0 and math.isfinite(self.lifetime_epsilon)):
            problems.append(f"lifetime-epsilon={self.lifetime_epsilon} must be finite and > 0")
        if not 0 < self.delta < 1:
            problems.append(f"delta={self.delta} must be in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant={self.accountant!r} must be one of {list(ACCOUNTANTS)}")
        if not (self.min_noise_multiplier >= 0 and math.isfinite(self.min_noise_multiplier)):
            problems.append(f"min-noise-multiplier={self.min_noise_multiplier} must be ≥ 0")
        if not self.max_round_epsilon > 0:
            problems.append(f"max-round-epsilon={self.max_round_epsilon} must be > 0")
        if self.declared_examples < 0:
            problems.append(f"declared-examples={self.declared_examples} must be ≥ 1 (or 0)")
        if problems:
            raise PolicyError("bad privacy policy: " + "; ".join(problems))

    def check_no_dp(self) -> None:
        """Raise :class:`PolicyRefusal` unless this holder allows training without DP."""
        if self.require_dp:
            raise PolicyRefusal(
                "the run asks for training without DP (dp = false), which this holder's "
                "policy forbids (require-dp = true)"
            )

    # -- files -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "policy") -> PrivacyPolicy:
        """Strict: unknown keys and wrong types are errors naming the key and the file."""
        known, unknown = kebab_fields(cls, raw)
        if unknown:
            raise PolicyError(
                f"{source}: unknown key(s) {unknown}; the keys are {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, value in raw.items():
            kind = known[key].type
            ok = {
                "str": isinstance(value, str),
                "bool": isinstance(value, bool),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, int | float) and not isinstance(value, bool),
            }[kind]
            if not ok:
                raise PolicyError(f"{source}: {key} = {value!r} is not a {kind}")
            values[known[key].name] = float(value) if kind == "float" else value
        try:
            return cls(**values)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> PrivacyPolicy:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PolicyError(
                f"privacy policy {path} does not exist: write one (see README, 'Privacy "
                "policy') or remove node config policy"
            ) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise PolicyError(f"privacy policy {path} cannot be read: {err}") from None
        return cls.from_mapping(raw, str(path))

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys as in ``policy.toml`` (an infinite cap is left out: TOML has inf,
        but the file reads better without the key)."""
        out = {k.replace("_", "-"): v for k, v in asdict(self).items()}
        if math.isinf(self.max_round_epsilon):
            del out["max-round-epsilon"]
        return out

    def save(self, path: str | Path) -> Path:
        from common.files import PUBLIC_MODE, write_file_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, tomli_w.dumps(self.to_mapping()).encode(), mode=PUBLIC_MODE)
        return path
