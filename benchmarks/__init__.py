"""fedvault benchmarks: numbers, never pass/fail. Run ``python -m benchmarks [SUITE ...]``."""
