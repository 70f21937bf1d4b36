"""Attention throughput (`sageflash bench`), written to CSV like Liger-Kernel's per-op benchmark scripts.

    python benchmarks/bench_attention.py                    # default shapes -> benchmarks/data/attention.csv
    python benchmarks/bench_attention.py --quick --csv out.csv --plot out.png

Takes every ``sageflash bench`` flag (``--help``); only the CSV default differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sageflash import bench

DEFAULT_CSV = Path(__file__).resolve().parent / "data" / "attention.csv"


def main(argv: list[str] | None = None) -> int:
    parser = bench.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(csv=str(DEFAULT_CSV))
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
