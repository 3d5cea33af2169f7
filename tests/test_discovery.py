"""Partition discovery costs a query per sampled client, not one per node of the federation.

A real run (`fedvault simulate` → Flower's simulation engine, 150 nodes, 3 sampled a round):
the server's log lists every QUERY reply it got ("partitions by node: {node: partition}"),
and the run record names each round's sampled partitions.
"""

import ast
import json
import re

import pytest

from tests.test_simulation import _run_dir, fedvault

pytestmark = pytest.mark.slow

NODES, SAMPLED, ROUNDS = 150, 3, 2
ANSWERS = re.compile(r"partitions by node: (\{.*\})")


def test_only_sampled_nodes_are_asked_their_partition(flower_home, tmp_path):
    out = tmp_path / "runs"
    fedvault("simulate", "digits-dp", "--num-clients", str(NODES), "--output-dir", str(out),
             "--set", f"num-server-rounds={ROUNDS}", "--set", f"fraction-train={SAMPLED / NODES}",
             "--set", "min-train-nodes=2", "--set", "fraction-evaluate=0.0",
             "--set", "encrypt-updates=true")  # fmt: skip
    run_dir = _run_dir(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    log = (run_dir / "simulation.log").read_text()

    answered: dict[int, int] = {}
    for match in ANSWERS.finditer(log):
        replies = ast.literal_eval(match.group(1))
        assert not set(replies) & set(answered), "a node was asked twice in one run"
        answered |= replies
    sampled = [set(r["sampled"]) for r in metrics["rounds"]]
    assert [len(s) for s in sampled] == [SAMPLED] * ROUNDS
    # one query per distinct sampled node, none to the other ~145 nodes
    assert len(answered) == len(set().union(*sampled)) <= SAMPLED * ROUNDS
    assert set(answered.values()) == set().union(*sampled)
    for r in metrics["rounds"]:  # sealed updates opened: the sealer knew every partition
        assert sorted(c["partition_id"] for c in r["clients"]) == sorted(r["sampled"])
        assert not r["failures"], r["failures"]
