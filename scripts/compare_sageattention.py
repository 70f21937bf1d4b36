#!/usr/bin/env python3
"""Write a built-in case as a dump with the official SageAttention output (SPEC §9-10).

Always q/k/v and the torch SDPA reference (.flash); where the official ``sageattention`` package
with ``sageattn_qk_int8_pv_fp8_cuda`` runs (a CUDA machine), also its output (.sage_quant), LSE
and quantized payloads, else it says what is missing. A shim over ``sageflash dump --official``:

    python scripts/compare_sageattention.py --case b1_causal_seq128_d64 --dump-prefix /tmp/b1 \
        [--pv-accum fp32] [--granularity per_thread] [--no-smooth-k] [--smooth-v] [--seed 1234]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout runs without installing

from sageflash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dump", "--official", *sys.argv[1:]]))
