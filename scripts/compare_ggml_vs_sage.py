#!/usr/bin/env python3
"""Compare the op with the official SageAttention output over dumps: RMS, max error, timings.

Reads ``<tmp-dir>/<case>.*`` for each ``--case`` (writing a missing dump first, removed afterwards
unless ``--keep-dumps``), runs ``run --load <dump> --compare sage`` in this package or, with
``--ggml-bin``, in an external binary with the same command line, and prints per case the RMS and
max error and the timings. A shim over ``sageflash compare``:

    python scripts/compare_ggml_vs_sage.py --case b1_causal_seq128_d64 --case b2_seq256_d128 \
        --tmp-dir /tmp/sage-dumps [--keep-dumps] [--ggml-bin ./build/bin/test-sageflash]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout runs without installing

from sageflash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
