"""Kernel benchmarks: `python -m kernels.benchmarks [--ops NAMES] [--quick]` runs every `bench_<op>.py` here.
Each module exposes `run(args) -> list[dict]`; the shared measuring code lives in `harness.py`."""
