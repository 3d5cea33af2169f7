"""Scenarios: one TOML file per use in ``simulations/``.

A scenario has a ``[run-config]`` table (any run-config key; the rest keep their defaults)
and a ``[federation]`` table (``num-supernodes``). Its opening comment says what it shows.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig

DEFAULT_SCENARIO = "digits-dp"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def scenario_dirs() -> list[Path]:
    """Where named scenarios live: the checkout's ``simulations/``, or the installed copy."""
    return [PROJECT_ROOT / "simulations", Path(__file__).resolve().parent / "scenarios"]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    description: str
    run_config: dict[str, Any]
    num_supernodes: int
    federation: dict[str, Any] = field(default_factory=dict)


def available() -> dict[str, Path]:
    """Scenario name → file, over every scenario directory (first one wins)."""
    found: dict[str, Path] = {}
    for folder in scenario_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def resolve(name_or_path: str | None) -> Path:
    """A scenario name (file stem in ``simulations/``) or a path to a TOML file."""
    name_or_path = name_or_path or DEFAULT_SCENARIO
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"scenario file {candidate} not found: check the path")
        return candidate
    known = available()
    if name_or_path not in known:
        raise ConfigError(
            f"unknown scenario {name_or_path!r}: use one of {sorted(known)} or a path to a .toml"
        )
    return known[name_or_path]


def load(name_or_path: str | None) -> Scenario:
    """Read and validate a scenario (its run config must be a valid :class:`RunConfig`)."""
    path = resolve(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"scenario {path} is not valid TOML ({err}): fix the file") from None
    unknown = sorted(set(data) - {"run-config", "federation"})
    if unknown:
        raise ConfigError(
            f"scenario {path} has unknown table(s) {unknown}: use [run-config] and [federation]"
        )
    run_config = dict(data.get("run-config", {}))
    RunConfig.from_mapping(run_config)  # fail now, not inside the simulation
    federation = dict(data.get("federation", {}))
    num_supernodes = federation.get("num-supernodes", 2)
    if type(num_supernodes) is not int or num_supernodes < 1:
        raise ConfigError(
            f"scenario {path}: [federation] num-supernodes = {num_supernodes!r} is not a whole "
            "number ≥ 1: fix the file, or pass --num-clients"
        )
    description = " ".join(
        line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")
    )
    return Scenario(path.stem, path, description, run_config, num_supernodes, federation)
