"""Crypto costs: the data container against raw AES-GCM, sealing one update, and the wall
time of the digits-dp scenario with and without encrypted data and sealed updates."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from benchmarks.common import REPO, save, simulate, table
from benchmarks.throughput import measure
from common import envelope
from common.crypto import open_sealed, seal
from common.federation_keys import client_dir, load_own, provision, server_dir
from common.models import build_model


def sealing_cost(repeat: int = 50) -> dict[str, float]:
    """Seconds to seal + open one LeNet-5 update (what encryption adds per client per round)."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = provision(Path(tmp), 1)
        client, server = load_own(client_dir(keys, 0)), load_own(server_dir(keys))
    content = RecordDict({"arrays": ArrayRecord(build_model("lenet5", 10).state_dict())})
    ctx = envelope.context(run_id=1, server_round=1, node_id=1, partition_id=0,
                           kind="update-train")  # fmt: skip
    started = time.perf_counter()
    for _ in range(repeat):
        blob = seal(envelope.encode(content), client, server.public, ctx)
        envelope.decode(open_sealed(blob, server, client.public, ctx))
    return {"seal_open_ms_per_update": 1000 * (time.perf_counter() - started) / repeat,
            "update_bytes": len(envelope.encode(content))}  # fmt: skip


def run(quick: bool = False) -> dict[str, Any]:
    print("crypto: container vs raw AES-256-GCM (one core, 64 KiB chunks)")
    tp = measure(16 if quick else 64)
    table([
        ("raw AES-GCM encrypt / decrypt", f"{tp['raw_encrypt_mb_s']:.0f} / {tp['raw_decrypt_mb_s']:.0f} MB/s"),  # noqa: E501
        ("raw, output kept in memory", f"{tp['raw_retained_encrypt_mb_s']:.0f} / {tp['raw_retained_decrypt_mb_s']:.0f} MB/s"),  # noqa: E501
        ("container streaming (files)", f"{tp['container_stream_encrypt_mb_s']:.0f} / {tp['container_stream_decrypt_mb_s']:.0f} MB/s  ({tp['container_stream_encrypt_vs_raw']:.2f}x raw)"),  # noqa: E501
        ("container in memory (bytes)", f"{tp['container_encrypt_mb_s']:.0f} / {tp['container_decrypt_mb_s']:.0f} MB/s  ({tp['container_encrypt_vs_raw_retained']:.2f}x raw kept)"),  # noqa: E501
    ])  # fmt: skip
    cost = sealing_cost()
    table([("seal + open one LeNet-5 update", f"{cost['seal_open_ms_per_update']:.2f} ms "
            f"({cost['update_bytes']} bytes)")])  # fmt: skip
    result: dict[str, Any] = {"throughput": tp, "sealing": cost}
    if not quick:
        walls = {}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            simulate("digits-dp", out / "warmup", "num-server-rounds=1")  # start the SuperLink
            keys = provision(out / "keys", 3)
            from common.data.encrypted import prepare

            enc = prepare(out / "enc", keys_dir=keys, dataset="digits", num_partitions=3)
            # the plain run needs holders that agreed to it: a scenario without sealing
            plain = out / "digits-plain.toml"
            plain.write_text((REPO / "simulations" / "digits-dp.toml").read_text()
                             .replace("encrypt-updates = true", "encrypt-updates = false"))
            for label, scenario, sets in (
                ("plain", str(plain), []),
                ("encrypted", "digits-dp", [f"keys-dir={keys}", f"encrypted-data-dir={enc}"]),
            ):  # fmt: skip
                r = simulate(scenario, out / label, *sets)
                server_seconds = r["metrics"]["summary"]["wall_seconds"]
                walls[label] = {"wall_seconds": r["wall_seconds"], "server_seconds": server_seconds}
        overhead = walls["encrypted"]["server_seconds"] / walls["plain"]["server_seconds"] - 1
        table([(f"digits-dp wall ({k})", f"{v['wall_seconds']:.1f} s total, "
                f"{v['server_seconds']:.1f} s in the ServerApp") for k, v in walls.items()]
              + [("encryption overhead (ServerApp time)", f"{100 * overhead:+.1f}%")])  # fmt: skip
        result["digits_dp"] = walls | {"overhead_fraction": overhead}
    save("crypto", result)
    return result
