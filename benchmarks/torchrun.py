"""Scaling under torchrun: the same sparse inversion job (K batches) on 1 rank and on 2 ranks,
each rank one CPU thread (gloo), alternating rounds so machine drift hits both alike.

    python benchmarks/torchrun.py [--batches 4] [--rounds 2]

Reports the job's wall time (launch to exit) and the inversion's own wall time (summary.json)
per rank count, their ratio, and checks that both produced the same pool. Writes
benchmarks/results/torchrun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from smi_engine.pool import shard_batches

from results_io import save_results

MODEL_ARGS = "img_size=64,patch_size=8,depth=4,embed_dim=96,num_heads=3,num_classes=10"


def invert(ranks: int, out: Path, opts) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "smi_cli", "invert", "--model", "vit_tiny_patch16_224", "--model-args", MODEL_ARGS,
               "--batch-size", str(opts.batch_size), "--batches", str(opts.batches), "--iterations", str(opts.iterations),
               "--schedule", opts.schedule, "--device", "cpu", "--checkpoint-every", "0", "--quiet", "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    job = time.perf_counter() - started
    return {"ranks": ranks, "job_seconds": job, "inversion_seconds": json.loads((out / "summary.json").read_text())["active_seconds"]}


def same_pool(a: Path, b: Path) -> bool:
    shards_a, shards_b = shard_batches(a / "pool"), shard_batches(b / "pool")
    if sorted(shards_a) != sorted(shards_b):
        return False
    return all(torch.equal(load_file(str(shards_a[i]))[key], load_file(str(shards_b[i]))[key])
               for i in shards_a for key in ("labels", "keep", "images"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--schedule", default="10:0.3,20:0.3,40:0.3,60:0.3")
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(opts.rounds):
            for ranks in (1, 2):
                runs[ranks].append(invert(ranks, Path(scratch) / f"r{round_}-n{ranks}", opts))
        identical = same_pool(Path(scratch) / "r0-n1", Path(scratch) / "r0-n2")
    median = {ranks: {key: statistics.median(r[key] for r in rs) for key in ("job_seconds", "inversion_seconds")}
              for ranks, rs in runs.items()}
    results = {"model_args": MODEL_ARGS, **vars(opts), "cpu_threads_per_rank": 1, "runs": runs, "median": median,
               "job_speedup": median[1]["job_seconds"] / median[2]["job_seconds"],
               "inversion_speedup": median[1]["inversion_seconds"] / median[2]["inversion_seconds"],
               "same_pool": identical}
    print("| ranks | job wall (s) | inversion wall (s) |\n|---:|---:|---:|")
    for ranks in (1, 2):
        print(f"| {ranks} | {median[ranks]['job_seconds']:.1f} | {median[ranks]['inversion_seconds']:.1f} |")
    print(f"2 ranks vs 1: {results['job_speedup']:.2f}x job, {results['inversion_speedup']:.2f}x inversion; "
          f"same pool: {identical}")
    print(f"wrote {save_results('torchrun', results)}")


if __name__ == "__main__":
    main()
