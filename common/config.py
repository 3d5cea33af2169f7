"""The run configuration, typed and validated once.

Flower hands both apps a flat ``run_config`` mapping (the ``[tool.flwr.app.config]`` table
of ``pyproject.toml`` plus overrides). Server and client read it through :class:`RunConfig`
so a typo or a wrong type fails at start-up with one line naming the key and the fix,
instead of deep inside a round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# How DP-SGD gets Σᵢ clip(gᵢ): "bookkeeping" is one backward pass (client/clipping.py),
# "ghost" and "hooks" are Opacus's two-pass ghost clipping and materialised per-sample grads.
GRAD_SAMPLE_MODES = ("bookkeeping", "ghost", "hooks")
# Data sets a holder brings itself (common/data/own.py), by name -> the kind of input they hold.
OWN_DATA_SOURCES = {"image-folder": "image", "text-file": "text"}


class ConfigError(ValueError):
    """A run-config key is missing, unknown or has a bad value."""


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key; defaults equal pyproject.toml's (the ``digits-dp`` scenario)."""

    dataset: str = "digits"
    data_dir: str = ""
    model: str = "lenet5"
    activation: str = "tanh"
    text_features: int = 4096
    text_hidden: int = 64
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 42
    num_server_rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.5
    momentum: float = 0.0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    round_timeout: float = 3600.0
    reply_poll_interval: float = 0.2
    fraction_evaluate: float = 0.0
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    accountant: str = "prv"
    grad_sample_mode: str = "bookkeeping"
    torch_threads: int = 1
    output_dir: str = "runs"
    encrypt_updates: bool = False
    keys_dir: str = ""
    encrypted_data_dir: str = ""
    classes: str = ""
    test_data: str = ""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (kebab-case keys); unknown keys are an error."""
        known, unknown = kebab_fields(cls, raw)
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}: check the spelling against {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, value in raw.items():
            f = known[key]
            values[f.name] = _coerce(key, value, f.type)
        config = cls(**values)
        config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case mapping, as it appears in pyproject.toml and metrics.json."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def declared_classes(self) -> tuple[str, ...]:
        """The operator's class list (``classes``, comma-separated, in the model's output
        order); empty for the built-in data sets, which bring their own."""
        if not self.classes:
            return ()
        names = tuple(name.strip() for name in self.classes.split(","))
        if len(names) < 2 or not all(names):
            raise ConfigError(
                f"bad run config: classes {self.classes!r} must list at least two "
                "comma-separated, non-empty class names"
            )
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(
                f"bad run config: classes {self.classes!r} names {twice} more than once"
            )
        return names

    def validate(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be ≥ 1"),
            (self.local_epochs >= 1, "local-epochs must be ≥ 1"),
            (self.batch_size >= 1, "batch-size must be ≥ 1"),
            (self.learning_rate > 0, "learning-rate must be > 0"),
            (
                0.0 < self.fraction_train <= 1.0,
                "fraction-train must be in (0, 1]: with 0 no client trains in any round",
            ),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
            (self.min_train_nodes >= 1, "min-train-nodes must be ≥ 1"),
            (self.round_timeout > 0, "round-timeout must be > 0 seconds"),
            (self.reply_poll_interval > 0, "reply-poll-interval must be > 0 seconds"),
            (self.partitioning in ("iid", "dirichlet"), "partitioning must be iid or dirichlet"),
            (self.dirichlet_alpha > 0, "dirichlet-alpha must be > 0"),
            (self.max_grad_norm > 0, "max-grad-norm must be > 0"),
            (self.noise_multiplier >= 0, "noise-multiplier must be ≥ 0 (0 = calibrate)"),
            (self.accountant in ("prv", "rdp"), "accountant must be prv or rdp"),
            (
                self.grad_sample_mode in GRAD_SAMPLE_MODES,
                f"grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}",
            ),
            (self.torch_threads >= 1, "torch-threads must be ≥ 1"),
            (self.text_features >= 16, "text-features must be ≥ 16"),
        ]
        if self.dp:
            checks += [
                (
                    0 < self.target_epsilon < math.inf,
                    "target-epsilon must be finite and > 0 (an infinite ε is no guarantee: "
                    "use dp = false for a non-private baseline)",
                ),
                (0 < self.target_delta < 1, "target-delta must be in (0, 1)"),
            ]
        checks += [
            (math.isfinite(getattr(self, f.name)), f"{f.name.replace('_', '-')} must be finite")
            for f in fields(self)
            if f.type == "float"
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad run config: {message}")
        self._validate_data_source()

    def _validate_data_source(self) -> None:
        """A holder-owned source needs the operator's class list and the server's held-out
        set; a built-in data set brings both, and a second class list would be a second owner."""
        own = self.dataset in OWN_DATA_SOURCES
        if own and not self.classes:
            raise ConfigError(
                f"bad run config: dataset {self.dataset} needs classes: declare the "
                'federation\'s class list, e.g. classes = "cat,dog"'
            )
        if own and not self.test_data:
            raise ConfigError(
                f"bad run config: dataset {self.dataset} needs test-data: the server's own "
                "held-out folder or file, of the same kind as the holders'"
            )
        if not own and (self.classes or self.test_data):
            raise ConfigError(
                f"bad run config: classes and test-data are for {list(OWN_DATA_SOURCES)}; "
                f"dataset {self.dataset} brings its own classes and test split"
            )
        self.declared_classes  # noqa: B018 -- parses, raising on a bad list


def kebab_fields(
    cls: type, raw: Mapping[str, Any]
) -> tuple[dict[str, dataclasses.Field], list[str]]:
    """A dataclass's fields by their kebab-case key (as TOML files spell them), and the keys
    of ``raw`` that name none of them (sorted): the run config and a holder's policy are
    read the same strict way."""
    known = {f.name.replace("_", "-"): f for f in fields(cls)}
    return known, sorted(set(raw) - set(known))


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, or fail naming the key."""
    type_name = getattr(type_name, "__name__", type_name)
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"run-config key {key!r} has value {value!r}, which is not a {type_name}: "
            f"fix it in the scenario or with --set {key}=<{type_name}>"
        ) from None
