"""Benchmarks and GPU validation (the CLI imports this package, never the reverse).

* :mod:`imbssl.bench.throughput`: ``imbssl bench``, training throughput of the
  device-resident pipeline beside the conventional one;
* :mod:`imbssl.bench.conventional`: the DataLoader + PIL pipeline it compares against;
* :mod:`imbssl.bench.measure`: step timing, peak memory, FLOPs, device name and peak;
* :mod:`imbssl.bench.validate`: ``analysis/gpu_validate.sh``, one command that validates
  every CUDA path and measures speed (``--dry-run`` on the CPU in the test suite).
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``imbssl bench [options]``."""
    from imbssl.bench.throughput import main as throughput_main

    return throughput_main(argv)
