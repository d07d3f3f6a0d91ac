"""Where benchmarks keep their results: benchmarks/results/ (not versioned)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save_results(name: str, results) -> Path:
    """Write ``results`` as benchmarks/results/NAME.json and return the path."""
    target = RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    return target
