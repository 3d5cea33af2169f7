"""The fedvault command: keys, data encryption, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.ops.cli import main, parse_set


def fedvault(*args):
    return subprocess.run([sys.executable, "-m", "common.ops.cli", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_parse_set_reads_toml_values():
    assert parse_set(["a=1", "b=0.5", "c=true", 'd="x"', "e=plain"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "x", "e": "plain"
    }  # fmt: skip


def test_keys_init_show_and_no_overwrite(tmp_path, capsys):
    out = tmp_path / "c0"
    assert main(["keys", "init", "--role", "client", "--name", "c0", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "ed25519_key_id" in shown and "data_key_id" in shown
    assert oct((out / "ed25519_private.pem").stat().st_mode & 0o777) == "0o600"
    again = fedvault("keys", "init", "--role", "client", "--name", "c0", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "Traceback" not in again.stderr
    assert main(["keys", "show", str(out)]) == 0


def test_data_encrypt_decrypt_round_trip_and_wrong_key(tmp_path):
    main(["keys", "init", "--role", "client", "--name", "a", "--out", str(tmp_path / "a")])
    main(["keys", "init", "--role", "client", "--name", "b", "--out", str(tmp_path / "b")])
    plain = tmp_path / "data.csv"
    plain.write_bytes(b"label,text\n" * 5000)
    enc, back = tmp_path / "data.fvd", tmp_path / "back.csv"
    assert main(["data", "encrypt", str(plain), str(enc), "--key", str(tmp_path / "a")]) == 0
    assert b"label,text" not in enc.read_bytes()
    assert main(["data", "decrypt", str(enc), str(back), "--key", str(tmp_path / "a")]) == 0
    assert back.read_bytes() == plain.read_bytes()
    wrong = fedvault("data", "decrypt", str(enc), str(tmp_path / "x"), "--key", str(tmp_path / "b"))
    assert wrong.returncode == 2 and "key id" in wrong.stderr and not (tmp_path / "x").exists()
    enc.write_bytes(enc.read_bytes()[:-7])  # truncated
    cut = fedvault("data", "decrypt", str(enc), str(tmp_path / "y"), "--key", str(tmp_path / "a"))
    assert cut.returncode == 2 and "Traceback" not in cut.stderr and not (tmp_path / "y").exists()


def test_keys_federation_and_data_prepare(tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", "federation", "--out", str(keys), "--clients", "2"]) == 0
    assert sorted(p.name for p in keys.iterdir()) == ["client-0", "client-1", "server"]
    out = tmp_path / "enc"
    assert main(["data", "prepare", "--dataset", "digits", "--clients", "2", "--keys", str(keys),
                 "--out", str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_partitions"] == 2 and set(manifest["data_key_ids"]) == {"0", "1"}


@pytest.mark.parametrize("args", [["evaluate", "/no/such/run"], ["predict", "/no/such/run", "x"]])
def test_missing_run_dir_is_one_line(args):
    proc = fedvault(*args)
    assert proc.returncode == 2 and "/no/such/run" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_a_run_where_no_client_ever_trained_exits_1(capsys):
    from common.ops.cli import _nothing_trained

    failure = {"partition_id": 0, "refused_budget": False, "reason": "ValueError: no draw"}
    untrained = {
        "rounds": [{"clients": [], "failures": [failure]}, {"clients": [], "failures": []}]
    }
    assert _nothing_trained(untrained) == 1
    err = capsys.readouterr().err
    assert "no client trained in any of the 2 rounds" in err and "ValueError: no draw" in err
    assert len(err.strip().splitlines()) == 1
    trained_once = {
        "rounds": [{"clients": [{"partition_id": 0}], "failures": []}, *untrained["rounds"]]
    }
    assert _nothing_trained(trained_once) == 0


HELP_COMMANDS = [
    [], ["simulate"], ["scenarios"], ["superlink"], ["superlink", "stop"], ["keys"],
    ["keys", "init"], ["keys", "federation"], ["data", "prepare"], ["evaluate"], ["predict"],
    ["provision"], ["fab-hash"], ["clientapp"],
]  # fmt: skip


def test_help_imports_neither_torch_nor_opacus():
    """`fedvault --help` and the commands' --help build the parser without torch/opacus
    (importing them took ≥ 5 s before every --help)."""
    probe = (
        "import sys\nfrom common.ops.cli import main\n"
        f"for argv in {HELP_COMMANDS!r}:\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "heavy = sorted(m for m in ('torch', 'opacus', 'sklearn', 'flwr') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["simulate", "--num-clients", "0"], "--num-clients: must be ≥ 1 (got 0)"),
        (["keys", "federation", "--out", "k", "--clients", "-2"], "--clients: must be ≥ 1"),
        (["data", "prepare", "--clients", "0", "--keys", "k", "--out", "e"],
         "--clients: must be ≥ 1 (got 0)"),
        (["data", "prepare", "--clients", "2", "--partition", "2", "--key", "k", "--out", "e"],
         "--partition 2 is not one of the 2 partitions"),
        (["provision", "--out", "f", "--superlink-host", "h", "--clients", "0"], "must be ≥ 1"),
    ],
)  # fmt: skip
def test_bad_counts_are_refused_in_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "common.ops.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_verbose_is_accepted_after_the_sub_command(tmp_path):
    assert fedvault("scenarios", "-v").returncode == 0
    proc = fedvault("simulate", "--set", "dataset=foo", "-v", "--output-dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown dataset 'foo'" in proc.stderr, proc.stderr


def test_keys_init_into_a_file_or_a_locked_dir_is_one_line(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        proc = fedvault("keys", "init", "--role", "client", "--name", "c", "--out", str(out))
        assert proc.returncode == 2 and "where a directory is needed" in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here")
    try:
        proc = fedvault("keys", "federation", "--out", str(locked / "k"), "--clients", "2")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert proc.returncode == 2 and "permission denied" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_data_prepare_prints_absolute_paths_for_relative_arguments(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "common.ops.cli", *a], cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run("keys", "federation", "--out", "keys", "--clients", "2").returncode == 0
    proc = run("data", "prepare", "--clients", "2", "--keys", "keys", "--out", "enc")
    assert proc.returncode == 0, proc.stderr
    assert f"--set encrypted-data-dir={tmp_path / 'enc'}" in proc.stdout
    assert f"--set keys-dir={tmp_path / 'keys'}" in proc.stdout


def test_relative_paths_in_the_run_config_are_made_absolute(tmp_path, monkeypatch):
    from common.ops import scenarios
    from common.ops.simulate import build_run_config

    monkeypatch.chdir(tmp_path)
    merged = build_run_config(
        scenarios.load(None),
        {"keys-dir": "keys", "encrypted-data-dir": "enc", "data-dir": "~/data"},
        output_dir=None,
    )
    assert merged["keys-dir"] == str(tmp_path / "keys")
    assert merged["encrypted-data-dir"] == str(tmp_path / "enc")
    assert merged["output-dir"] == str(tmp_path / "runs")
    assert merged["data-dir"] == str(Path.home() / "data")
