"""Speed benchmark: DeiT-Tiny 224, batch 8, the seed's schedule scaled to the iteration count.

    python benchmarks/speed.py [smi bench options]

Prints the side-by-side table and writes benchmarks/results/speed.json (same as
``smi bench --out benchmarks/results/speed.json``).
"""

import sys
from pathlib import Path

from smi_cli.app import app

if __name__ == "__main__":
    results = Path(__file__).parent / "results" / "speed.json"
    app(["bench", "--out", str(results), *sys.argv[1:]])
