"""Quantisation benchmark on Fashion-MNIST: every scheme, with and without block reconstruction,
at low bit widths, calibrated on noise, the dense pool, the smi pool (hybrid, as tokens and
blanked), a Patch Rebirth pool (hybrid and as tokens) and real images.

    python benchmarks/quantization.py [--out benchmarks/results/fashion-mnist] [--seeds 0 1 2]
        [--schemes matmul seed repq repq:softmax=adaptive-log] [--bits 4:4 3:3 4:3]
        [--sources noise dense smi-hybrid ... real] [--modes none block] [--recon-iters 500] [--limit 10000]

A scheme is NAME or NAME:KEY=VALUE,... (its options). The teacher and the pools are
quality.py's (same folder, same commands: a step whose output exists is reused, so the two
benchmarks share them). Each cell is one in-process run equal to `smi quantize --scheme NAME
[--scheme-option NAME.KEY=VALUE ...] --w-bit W --a-bit A --calib C --calib-size 64 --seed SEED
[--reconstruct block] [--sparse-calib F]` (source POOL-F, e.g. smi-tokens), top-1 on the first
--limit test images; the wall time of calibration (and of reconstruction within it) is recorded
per cell; every ranges-only cell runs before the first reconstruction. Each seed's cells are
cached in its folder (quantization-cells.json): an interrupted run goes on where it stopped, and
--report-only writes the tables from what is there. Writes quantization.json and
quantization.md in --out (a cell measured on fewer seeds than asked says how many).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import BATCH, MODEL_ARGS, SELECTIONS, base_parser, run  # noqa: E402  (the shared teacher and pools)

POOL_SOURCES = {"dense": ["--schedule", "dense", "--batch-size", str(BATCH)],
                "smi": ["--schedule", SELECTIONS["smi"][1], "--selection", *SELECTIONS["smi"][0],
                        "--batch-size", str(SELECTIONS["smi"][2])],
                "pri": ["--schedule", SELECTIONS["pri-v4"][1], "--selection", *SELECTIONS["pri-v4"][0],
                        "--batch-size", str(SELECTIONS["pri-v4"][2])]}
POOL_FOLDERS = {"dense": "dense", "smi": "smi", "pri": "pri-v4"}
SOURCES = ("noise", "dense", "smi-hybrid", "smi-tokens", "smi-blanked", "pri-hybrid", "pri-tokens", "real")
EVAL_BATCH = 250  # 500 images' attention maps (34 MB) pass glibc's 32 MB mmap ceiling: every op page-faults


def main() -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--schemes", nargs="+", default=["matmul", "seed", "repq"], type=_scheme_spec,
                        help="NAME or NAME:KEY=VALUE,... (scheme options)")
    parser.add_argument("--bits", nargs="+", default=["4:4", "3:3", "4:3"], help="W:A pairs")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--modes", nargs="+", default=["none", "block"], choices=["none", "block"],
                        help="--reconstruct modes (ranges only first)")
    parser.add_argument("--recon-iters", type=int, default=500)
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated per cell")
    parser.add_argument("--iterations", type=int, default=400, help="inversion iterations of the pools")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the cells measured so far (each seed's cache), measuring nothing")
    opts = parser.parse_args()
    out, data, device = opts.out, f"fashion-mnist:{opts.fashion}", ["--device", opts.device]
    commands: list[dict] = []
    teacher = out / "teacher"
    run(commands, ["teacher", "train", "--model", "vit_tiny_patch16_224", "--model-args", MODEL_ARGS, "--mean", "0.286",
                   "--std", "0.353", "--batch-size", "128", "--lr", "2e-3", "--shift", "0.1", "--quiet", *device,
                   "--data", data, "--epochs", "5", "--out", str(teacher)], "teacher", teacher / "summary.json")
    invert = ["invert", "--teacher", str(teacher), "--lr", "0.1", "--loss-option", "deepinversion.tv_l2=3e-3",
              "--checkpoint-every", "0", "--quiet", "--iterations", str(opts.iterations), "--batches", str(opts.batches),
              *device]
    results: dict = {"cells": {}, "commands": commands}
    for seed in opts.seeds:
        folder = out / f"seed-{seed}"
        if opts.report_only:
            results["cells"].update(_cached(folder))
            continue
        for source in {s.partition("-")[0] for s in opts.sources} & set(POOL_SOURCES):
            target = folder / POOL_FOLDERS[source]
            run(commands, invert + POOL_SOURCES[source] + ["--seed", str(seed), "--out", str(target)],
                f"invert-{source}-{seed}", target / "summary.json")
        results["cells"].update(_cells(folder, teacher, data, seed, opts))
    (out / "quantization.json").write_text(json.dumps(results, indent=2))
    table = _table(results["cells"], opts)
    (out / "quantization.md").write_text(table)
    print(table)
    return results


def _cells(folder: Path, teacher: Path, data: str, seed: int, opts) -> dict:
    from smi_engine.data import ModelInput, load_data, loader
    from smi_engine.downstream.evaluate import evaluate
    from smi_engine.models import ModelSpec, load_model
    from smi_engine.runtime.device import resolve_device

    cells = _cached(folder)
    device = resolve_device(opts.device)
    loaded = load_model(ModelSpec.from_dir(teacher), device)
    val = list(loader(load_data(data).val, ModelInput.for_model(loaded.model, loaded.normalizer), EVAL_BATCH))
    cells.setdefault(f"{seed}/fp32", evaluate(loaded.model, val, device, opts.limit)["top1"])
    # Ranges only first, every cell (minutes), then reconstruction (the hours): an interrupted
    # run has the whole ranges-only matrix.
    for mode in opts.modes:
        for scheme in opts.schemes:
            for bits in opts.bits:
                w, a = map(int, bits.split(":"))
                for source in opts.sources:
                    key = f"{seed}/{scheme}/W{w}A{a}/{source}/{mode}"
                    if key not in cells:
                        cell = _cell(loaded, val, folder, data, device, (seed, scheme, w, a, source, mode), opts)
                        print(f"{key}: {cell['top1']:.2f}% (calibration {cell['seconds']:.1f} s, of which "
                              f"reconstruction {cell['reconstruction_seconds']:.1f} s)", flush=True)
                        cells.update(_record(folder, {f"{seed}/fp32": cells[f"{seed}/fp32"], key: cell}))
    return cells


def _record(folder: Path, new: dict) -> dict:
    """Add ``new`` cells to the seed's cache and return all of it: under a lock, merged with what
    is on disk (another process may be measuring other schemes of the seed), replaced atomically
    (an interrupted write leaves the old cache)."""
    from smi_engine.files import write_json

    with open(folder / ".quantization-cells.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cells = {**_cached(folder), **new}
        write_json(folder / "quantization-cells.json", cells)
    return cells


def _cached(folder: Path) -> dict:
    cache = folder / "quantization-cells.json"
    return json.loads(cache.read_text()) if cache.exists() else {}


def _cell(loaded, val, folder: Path, data: str, device, setting: tuple, opts) -> dict:
    """One quantisation of the matrix, ``setting`` = (seed, scheme, w, a, source, mode): its top-1 and times."""
    from smi_engine.downstream.evaluate import evaluate
    from smi_engine.downstream.quantize import QuantizeJob, calibrate
    from smi_engine.quantization import QuantConfig
    from smi_engine.quantization.names import ReconstructConfig

    seed, scheme, w, a, source, mode = setting
    pool, _, feed = source.partition("-")
    calib = {"noise": "noise", "real": f"real:{data}"}.get(pool) or str(folder / POOL_FOLDERS[pool])
    started = time.perf_counter()
    name, _, options = scheme.partition(":")
    quant = QuantConfig(w, a, scheme=name, scheme_options=dict(o.split("=", 1) for o in options.split(",") if o))
    job = QuantizeJob(loaded.spec, calib, data, quant, calib_size=BATCH, seed=seed,
                      reconstruct=ReconstructConfig(mode, opts.recon_iters), sparse_calib=feed or "hybrid")
    qmodel, info = calibrate(loaded, job, device)
    seconds = time.perf_counter() - started
    return {"top1": evaluate(qmodel, val, device, opts.limit)["top1"], "seconds": seconds,
            "reconstruction_seconds": info.get("reconstruction", {}).get("seconds", 0.0)}


def _scheme_spec(text: str) -> str:
    _, _, options = text.partition(":")
    if any("=" not in o for o in options.split(",") if o) or text.startswith(":"):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME or NAME:KEY=VALUE,...: e.g. repq:softmax=adaptive-log")
    return text


def _table(cells: dict, opts) -> str:
    def values(suffix: str) -> list[float]:
        return [cells[f"{s}/{suffix}"]["top1"] for s in opts.seeds if f"{s}/{suffix}" in cells]

    def cell(suffix: str) -> str:  # mean ± std, and how many seeds where some are missing
        v = values(suffix)
        missing = f" ({len(v)})" if len(v) < len(opts.seeds) else ""
        return "" if not v else f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}{missing}"

    fp32 = [cells[f"{s}/fp32"] for s in opts.seeds if f"{s}/fp32" in cells]
    lines = [f"fp32 top-1 {statistics.mean(fp32):.2f} % (first {opts.limit} test images), seeds {opts.seeds}, "
             f"reconstruction {opts.recon_iters} iterations per unit", "",
             "| scheme | W/A | reconstruct | " + " | ".join(opts.sources) + " | seconds (dense / smi-hybrid) |",
             "|---|---|---|" + "---:|" * (len(opts.sources) + 1)]

    def seconds(suffix: str) -> str:
        times = [cells[k]["seconds"] for s in opts.seeds if (k := f"{s}/{suffix}") in cells]
        return f"{statistics.mean(times):.0f}" if times else "-"

    for scheme in opts.schemes:
        for bits in opts.bits:
            w, a = bits.split(":")
            for mode in opts.modes:
                row = [cell(f"{scheme}/W{w}A{a}/{source}/{mode}") for source in opts.sources]
                times = " / ".join(seconds(f"{scheme}/W{w}A{a}/{pool}/{mode}") for pool in ("dense", "smi-hybrid"))
                lines.append(f"| {scheme} | W{w}A{a} | {mode} | " + " | ".join(row) + f" | {times} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
