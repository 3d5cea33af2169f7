"""Every shipped scenario is valid and says what it shows."""

import pytest

from common.config import ConfigError, RunConfig
from common.ops import scenarios

REQUIRED = {"digits-dp", "mnist-iid-dp", "mnist-dirichlet-dp", "mnist-nodp", "agnews-dp", "sms-dp"}


def test_required_scenarios_ship():
    assert set(scenarios.available()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_scenario_is_valid_and_described(name):
    scenario = scenarios.load(name)
    config = RunConfig.from_mapping(scenario.run_config)
    assert scenario.description.startswith(name)
    assert scenario.num_supernodes >= config.min_train_nodes
    if name == "mnist-iid-dp":
        budget = (config.target_epsilon, config.target_delta)
        assert budget == (3.0, 1e-5) and scenario.num_supernodes == 10
    assert config.dp == (name != "mnist-nodp")


def test_default_is_the_offline_digits_scenario():
    assert scenarios.load(None).name == "digits-dp"
    assert RunConfig.from_mapping(scenarios.load(None).run_config).dataset == "digits"


def test_bad_scenario_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run-config]\nbatch-size = "many"\n')
    with pytest.raises(ConfigError, match="'batch-size' has value 'many'"):
        scenarios.load(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("[run-config\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        scenarios.load(str(broken))


def test_simulated_holders_agree_to_the_scenario_not_to_the_overrides(tmp_path):
    """`--set target-epsilon=1000 --set dp=false` is the operator's request: the simulated
    holders' policies come from the scenario file, so they refuse it like real ones would."""
    from common.federation_keys import client_dir
    from common.ops import scenarios
    from common.ops.simulate import build_run_config, simulated_holders
    from common.privacy.policy import POLICY_FILE, PrivacyPolicy

    scenario = scenarios.load("digits-dp")
    overrides = {"target-epsilon": 1000.0, "dp": False, "encrypt-updates": False}
    run_config = build_run_config(scenario, overrides, tmp_path)
    keys = simulated_holders(run_config, scenario, tmp_path, 2)
    for pid in (0, 1):
        policy = PrivacyPolicy.load(client_dir(keys, pid) / POLICY_FILE)
        assert policy.lifetime_epsilon == 8.0 and policy.require_dp and policy.require_sealing
        assert policy.dataset_id == f"digits-partition-{pid}"
