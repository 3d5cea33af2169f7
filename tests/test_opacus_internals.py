"""The Opacus internals fedvault relies on resolve, and other Opacus versions are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import opacus
import pytest

from common.privacy import opacus_internals
from common.privacy.opacus_internals import OpacusVersionError, check_version


@pytest.mark.parametrize("name", opacus_internals.__all__)
def test_every_name_resolves_on_the_installed_opacus(name):
    assert getattr(opacus_internals, name) is not None


def test_the_samplers_cover_the_layers_bookkeeping_supports():
    from client.clipping import SUPPORTED_LAYERS

    for layer in SUPPORTED_LAYERS:
        assert layer in opacus_internals.GRAD_SAMPLERS or layer in opacus_internals.NORM_SAMPLERS


def test_the_installed_opacus_is_accepted():
    check_version(opacus.__version__)


@pytest.mark.parametrize("version", ["1.6.0", "1.6.1", "1.6.2.dev0", "1.6.0+cu121"])
def test_versions_in_range_are_accepted(version):
    check_version(version)


@pytest.mark.parametrize("version", ["1.5.4", "1.7.0", "2.0.0", "0.16.3", "garbage"])
def test_a_version_outside_the_range_is_refused_in_one_line(version):
    with pytest.raises(OpacusVersionError) as err:
        check_version(version)
    message = str(err.value)
    assert "\n" not in message
    assert version in message
    assert f"pip install '{opacus_internals.REQUIREMENT}'" in message


def test_the_verified_range_is_pyprojects_requirement():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    assert opacus_internals.REQUIREMENT == "opacus>=1.6,<1.7"
    assert opacus_internals.REQUIREMENT in deps
