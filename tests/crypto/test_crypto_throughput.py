"""``measure()`` returns usable numbers (no thresholds: timings are for benchmarks, not tests)."""

from __future__ import annotations

from benchmarks.throughput import measure


def test_measure_reports_all_rates() -> None:
    result = measure(mb=1, repeat=1)
    for op in ("encrypt", "decrypt"):
        for kind in ("raw", "raw_retained", "container", "container_stream"):
            value = result[f"{kind}_{op}_mb_s"]
            assert isinstance(value, float) and value > 0
        assert result[f"container_{op}_vs_raw"] > 0
    assert result["chunk_size"] == 65536 and result["mb"] == 1
