"""The run config refuses values that would make a run meaningless."""

import re

import pytest


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("fraction-train", 0.0, "fraction-train must be in (0, 1]"),
        ("target-epsilon", float("inf"), "target-epsilon must be finite"),
        ("max-grad-norm", float("inf"), "max-grad-norm must be finite"),
    ],
)
def test_values_that_make_a_run_meaningless_are_refused(key, value, message):
    """Before: fraction-train=0 ran empty rounds; an infinite ε was accepted."""
    from common.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping({key: value})


def test_the_dataclass_defaults_are_pyprojects():
    """Two owners of the defaults would drift: `flwr run .` reads pyproject.toml, everything
    else RunConfig's defaults."""
    import tomllib
    from pathlib import Path

    from common.config import RunConfig

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
