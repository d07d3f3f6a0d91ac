"""Quality benchmark on Fashion-MNIST: does sparse inversion serve the data-free tasks as well as
dense inversion, for less inversion time?

    python benchmarks/quality.py [--out benchmarks/results/fashion-mnist] [--device cpu]

Runs the real ``smi`` commands (recorded in results.json), step by step; a step whose output
already exists is reused, so an interrupted benchmark continues where it stopped. Writes
results.json, results.md (the tables) and accuracy-vs-time.png into the output folder.
Needs Debian's dataset-fashion-mnist (or --fashion DIR with the four idx files).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODEL_ARGS = "img_size=32,patch_size=4,in_chans=1,embed_dim=64,depth=4,num_heads=4,mlp_ratio=2"
STUDENT_ARGS = "img_size=32,patch_size=4,in_chans=1,embed_dim=64,depth=2,num_heads=4,mlp_ratio=2"
SPARSE = "20:0.3,40:0.3,80:0.3,120:0.3"
BITS = ((8, 8), (4, 8), (4, 4))


def run(commands: list[dict], args: list[str], name: str, output: Path) -> float:
    """Run ``smi ARGS`` unless ``output`` exists; record the command and its wall time. A run
    directory (``output`` is its summary.json) left unfinished by an interrupted benchmark is
    started again from scratch, so its timing stays whole."""
    line = "smi " + " ".join(shlex.quote(a) for a in args)
    record = {"step": name, "command": line}
    if output.exists():
        record["reused"] = True
    else:
        if output.name == "summary.json" and output.parent.exists():
            shutil.rmtree(output.parent)
        print(f"$ {line}", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "smi_cli", *args], check=True)
        record["wall_seconds"] = time.perf_counter() - started
    commands.append(record)
    return record.get("wall_seconds", 0.0)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fashion-mnist")
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batches", type=int, default=8, help="inverted batches of 64 per pool (equal image budget)")
    parser.add_argument("--student-epochs", type=int, default=40)
    opts = parser.parse_args()
    out, data, device = opts.out, f"fashion-mnist:{opts.fashion}", ["--device", opts.device]
    out.mkdir(parents=True, exist_ok=True)
    commands: list[dict] = []
    teacher = out / "teacher"

    run(commands, ["teacher", "train", "--data", data, "--model", "vit_tiny_patch16_224", "--model-args", MODEL_ARGS,
                   "--mean", "0.286", "--std", "0.353", "--epochs", str(opts.teacher_epochs), "--batch-size", "128",
                   "--lr", "2e-3", "--shift", "0.1", "--out", str(teacher), "--quiet", *device], "teacher", teacher / "summary.json")

    invert = ["invert", "--teacher", str(teacher), "--batch-size", "64", "--lr", "0.1", "--loss-option",
              "deepinversion.tv_l2=3e-3", "--checkpoint-every", "0", "--quiet", *device]
    iterations = ["--iterations", str(opts.iterations)]
    pools = {  # "noise": one step from the starting Gaussian noise, the no-inversion baseline
        "noise": ["--schedule", "dense", "--iterations", "1", "--batches", str(opts.batches)],
        "dense": ["--schedule", "dense", *iterations, "--batches", str(opts.batches)],
        "sparse": ["--schedule", SPARSE, *iterations, "--batches", str(opts.batches)],
    }
    for name, extra in pools.items():
        run(commands, invert + extra + ["--out", str(out / name)], f"invert-{name}", out / name / "summary.json")
    # Equal inversion time: as many sparse batches as fit in the dense pool's time.
    dense_time, sparse_time = summary(out / "dense")["seconds"], summary(out / "sparse")["seconds"]
    equal_time = max(opts.batches, int(opts.batches * dense_time / sparse_time))
    run(commands, invert + ["--schedule", SPARSE, *iterations, "--batches", str(equal_time), "--out", str(out / "sparse-equal-time")],
        "invert-sparse-equal-time", out / "sparse-equal-time" / "summary.json")

    quant = {}
    for w, a in BITS:
        for name, calib in (("noise", "noise"), ("dense", str(out / "dense")), ("sparse", str(out / "sparse")), ("real", f"real:{data}")):
            target = out / f"quant-w{w}a{a}-{name}.json"
            run(commands, ["quantize", "--teacher", str(teacher), "--calib", calib, "--data", data, "--w-bit", str(w),
                           "--a-bit", str(a), "--calib-size", "64", "--json", str(target), *device], f"quantize-w{w}a{a}-{name}", target)
            quant[(w, a, name)] = json.loads(target.read_text())

    kt = {}
    for name in ("noise", "dense", "sparse", "sparse-equal-time"):
        target = out / f"kt-{name}"
        run(commands, ["distill", "--teacher", str(teacher), "--student", "vit_tiny_patch16_224", "--student-args", STUDENT_ARGS,
                       "--pool", str(out / name), "--data", data, "--epochs", str(opts.student_epochs), "--lr", "2e-3",
                       "--temperature", "4", "--out", str(target), "--quiet", *device], f"distill-{name}", target / "summary.json")
        kt[name] = summary(target)

    results = report(out, teacher, quant, kt, commands)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy-vs-time.png'}")
    return results


def report(out: Path, teacher: Path, quant: dict, kt: dict, commands: list[dict]) -> dict:
    pools = {name: summary(out / name) for name in ("noise", "dense", "sparse", "sparse-equal-time")}
    teacher_summary = summary(teacher)
    lines = [
        f"Teacher: ViT ({MODEL_ARGS}) trained by `smi teacher train`: top-1 {teacher_summary['top1']:.2f}% on the "
        f"Fashion-MNIST test set ({teacher_summary['seconds'] / 60:.1f} min).",
        "",
        "| pool | images | inversion time (s) | kept patches | teacher acc. on pool |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in pools.items():
        lines.append(f"| {name} | {s['images']} | {s['seconds']:.1f} | {s['kept_patches']}/{s['num_patches']} | {100 * s['teacher_accuracy']:.1f}% |")
    lines += ["", "Quantised top-1 (%) on the 10,000 test images (fp32 {:.2f}%), 64 calibration images, min-max:".format(
        next(iter(quant.values()))["fp32_top1"]), "",
        "| W/A | noise | dense inversion | sparse inversion | real images |", "|---|---:|---:|---:|---:|"]
    for w, a in BITS:
        row = " | ".join(f"{quant[(w, a, n)]['top1']:.2f}" for n in ("noise", "dense", "sparse", "real"))
        lines.append(f"| W{w}A{a} | {row} |")
    lines += ["", "Distilled student (ViT, depth 2, from scratch) best top-1 (%) on the test set:", "",
              "| synthetic data | images | inversion time (s) | student top-1 |", "|---|---:|---:|---:|"]
    for name, s in kt.items():
        lines.append(f"| {name} | {pools[name]['images']} | {pools[name]['seconds']:.1f} | {s['best_top1']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    results = {"teacher": teacher_summary, "pools": pools, "commands": commands,
               "quantize": {f"w{w}a{a}-{n}": v for (w, a, n), v in quant.items()},
               "distill": {n: {k: v for k, v in s.items() if k != "history"} for n, s in kt.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(out, pools, quant, kt)
    return results


def plot(out: Path, pools: dict, quant: dict, kt: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"noise": "x", "dense": "s", "sparse": "o", "sparse-equal-time": "D"}
    for w, a, colour in ((4, 8, "tab:blue"), (4, 4, "tab:orange")):
        for name in ("noise", "dense", "sparse"):
            ax.scatter(pools[name]["seconds"], quant[(w, a, name)]["top1"], marker=markers[name], color=colour,
                       label=f"W{w}A{a} quantised, {name}")
    for name, s in kt.items():
        ax.scatter(pools[name]["seconds"], s["best_top1"], marker=markers[name], color="tab:green", label=f"distilled, {name}")
    ax.set_xlabel("inversion time of the synthetic data (s, 2 CPU cores)")
    ax.set_ylabel("top-1 on Fashion-MNIST test (%)")
    ax.set_title("Accuracy against inversion time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "accuracy-vs-time.png", dpi=120)


if __name__ == "__main__":
    main()
