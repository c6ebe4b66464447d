#!/usr/bin/env python3
"""`just bench`: runs the bench package (bench/asyncpay_bench, one module per step). See
bench/README.md; `python3 bench/bench.py --help` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from asyncpay_bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
