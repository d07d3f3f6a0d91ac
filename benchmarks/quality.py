"""Quality benchmark on Fashion-MNIST: does sparse inversion serve the data-free tasks as well as
dense inversion, for less inversion time? Every selection policy (smi; Patch Rebirth as published,
every:V with attention and random selection; the frozen variant), the seed's downstream protocols,
3 seeds.

    python benchmarks/quality.py [--out benchmarks/results/fashion-mnist] [--device cpu] [--seeds 0 1 2]
        [--schemes seed matmul repq]

1. A teacher (ViT, all ten classes) and a student backbone of the same shape pretrained on
   classes 0-4 only (data disjoint from the task, standing in for the seed's ImageNet DeiT),
   both by `smi teacher train`.
2. Per seed: pools of --batches x 64 images: noise (the starting Gaussian noise), dense
   inversion, and for each selection (smi and the frozen pri and dropping random at the seed's
   schedule scaled; pri and random emitting at every:2, every:4 and every:7, each batch of
   64 // V trajectories making about 64 images) a pool of the same image budget and one given
   the dense pool's inversion time (as many batches as fit).
3. Quantisation (the seed's test_quant.py protocol: calibrate on one draw of 64 images, top-1
   on the 10,000 test images), for every scheme (seed, matmul, repq; --schemes), W/A in W8A8,
   W4A8, W4A4, W4A3, W3A3, calibrated on noise, dense, smi and real images; W4A4 and W3A3 on
   every pool. Run in-process; each equals `smi quantize --scheme S --w-bit W --a-bit A
   --calib C --calib-size 64 --seed SEED`.
4. Knowledge transfer by the seed's test_kt.py protocol: `smi distill --recipe seed` (linear
   probe of the pretrained student, SGD 0.1 constant, T 20, 1,000 rounds of one step on 32
   images drawn from the pool so far, flips), each pool revealed one inverted batch per round.

Every `smi` command is recorded in results.json; a step whose output exists is reused, so an
interrupted benchmark continues where it stopped. Writes results.json, results.md (the tables)
and accuracy-vs-time.png. Needs Debian's dataset-fashion-mnist (or --fashion DIR).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL_ARGS = "img_size=32,patch_size=4,in_chans=1,embed_dim=64,depth=4,num_heads=4,mlp_ratio=2"
SPARSE = "20:0.3,40:0.3,80:0.3,120:0.3"  # the seed's 50,100,200,300 @ 0.3 for 4000 iterations, scaled to 400 (x2)
#: name -> (--selection with its options, --schedule, trajectories per batch): every batch makes about BATCH images.
SELECTIONS = {
    "smi": (["smi"], SPARSE, 64),
    "pri-frozen": (["pri", "--selection-option", "pri.leaving=freeze"], SPARSE, 64),
    "random-drop": (["random", "--selection-option", "random.leaving=drop"], SPARSE, 64),
    **{f"{name}-v{v}": ([name], f"every:{v}", 64 // v) for v in (2, 4, 7) for name in ("pri", "random")},
}
BITS = ((8, 8), (4, 8), (4, 4), (4, 3), (3, 3))
LOW_BITS = ((4, 4), (3, 3))  # the settings where the calibration data matters
SCHEMES = ("seed", "matmul", "repq")
SOURCES = ("noise", "dense", "smi", "real")  # the full scheme x W/A matrix
POOLS = ("noise", "dense", *(f"{name}{suffix}" for name in SELECTIONS for suffix in ("", "-equal-time")))
BATCH = 64


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


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every Fashion-MNIST benchmark shares (its results folder, data, device, seeds)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fashion-mnist")
    parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser


def main() -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batches", type=int, default=4, help="inverted batches of 64 per pool (equal image budget)")
    parser.add_argument("--rounds", type=int, default=1000, help="knowledge-transfer rounds (the seed: 1,000)")
    parser.add_argument("--val-every", type=int, default=100, help="validate the student every N rounds")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES, help="quantisation schemes")
    opts = parser.parse_args()
    out, data, device = opts.out, f"fashion-mnist:{opts.fashion}", ["--device", opts.device]
    out.mkdir(parents=True, exist_ok=True)
    commands: list[dict] = []
    teacher, student = out / "teacher", out / "student-classes-0-4"
    train = ["teacher", "train", "--model", "vit_tiny_patch16_224", "--model-args", MODEL_ARGS, "--mean", "0.286",
             "--std", "0.353", "--batch-size", "128", "--lr", "2e-3", "--shift", "0.1", "--quiet", *device]
    run(commands, train + ["--data", data, "--epochs", str(opts.teacher_epochs), "--out", str(teacher)], "teacher",
        teacher / "summary.json")
    run(commands, train + ["--data", f"{data}@0-4", "--epochs", str(opts.student_epochs), "--out", str(student)],
        "student-backbone", student / "summary.json")

    invert = ["invert", "--teacher", str(teacher), "--lr", "0.1", "--loss-option",
              "deepinversion.tv_l2=3e-3", "--checkpoint-every", "0", "--quiet", *device]
    iterations = ["--iterations", str(opts.iterations)]
    quant, kt = {}, {}
    for seed in opts.seeds:
        folder = out / f"seed-{seed}"
        pools = {  # "noise": one step from the starting Gaussian noise, the no-inversion baseline
            "noise": ["--schedule", "dense", "--batch-size", str(BATCH), "--iterations", "1", "--batches", str(opts.batches)],
            "dense": ["--schedule", "dense", "--batch-size", str(BATCH), *iterations, "--batches", str(opts.batches)],
        }
        for name, (selection, schedule, trajectories) in SELECTIONS.items():
            pools[name] = ["--schedule", schedule, "--selection", *selection, "--batch-size", str(trajectories),
                           *iterations, "--batches", str(opts.batches)]

        def invert_pool(name: str, extra: list[str]) -> None:
            run(commands, invert + extra + ["--seed", str(seed), "--out", str(folder / name)], f"invert-{name}-{seed}",
                folder / name / "summary.json")

        for name, extra in pools.items():
            invert_pool(name, extra)
        # Equal inversion time: as many batches as fit in the dense pool's time.
        dense_time = summary(folder / "dense")["seconds"]
        for name in SELECTIONS:
            fitting = max(opts.batches, int(opts.batches * dense_time / summary(folder / name)["seconds"]))
            invert_pool(f"{name}-equal-time", [*pools[name][:-1], str(fitting)])
        quant[seed] = quantisation_matrix(folder, teacher, data, seed, opts.device, opts.schemes)
        for name in POOLS:
            target = folder / f"kt-{name}"
            run(commands, ["distill", "--recipe", "seed", "--teacher", str(teacher), "--student", str(student),
                           "--pool", str(folder / name), "--grow", str(BATCH), "--rounds", str(opts.rounds),
                           "--val-every", str(opts.val_every), "--data", data, "--seed", str(seed), "--out", str(target),
                           "--quiet", *device], f"distill-{name}-{seed}", target / "summary.json")
            kt[(seed, name)] = summary(target)

    results = report(out, teacher, student, opts.seeds, quant, kt, commands, opts.schemes)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy-vs-time.png'}")
    return results


def quantisation_matrix(folder: Path, teacher: Path, data: str, seed: int, device: str, schemes: list[str]) -> dict:
    """Top-1 of every scheme x bit-width x calibration source, and of W4A4/W3A3 calibrated on
    every pool, cached in quantize.json."""
    target = folder / "quantize.json"
    if target.exists():
        return json.loads(target.read_text())
    from smi_engine.data import ModelInput, load_data, loader
    from smi_engine.runtime.device import resolve_device
    from smi_engine.downstream.evaluate import evaluate
    from smi_engine.models import ModelSpec, load_model
    from smi_engine.quantization import QuantConfig
    from smi_engine.downstream.quantize import QuantizeJob, calibrate

    torch_device = resolve_device(device)
    loaded = load_model(ModelSpec.from_dir(teacher), torch_device)
    val = list(loader(load_data(data).val, ModelInput.for_model(loaded.model, loaded.normalizer), 500))
    results = {"fp32_top1": evaluate(loaded.model, val, torch_device)["top1"]}
    # An equal-time pool calibrates exactly as its equal-budget twin: the same 64-image draw.
    calib = {name: str(folder / name) for name in POOLS if name != "noise" and not name.endswith("-equal-time")}
    calib.update({"noise": "noise", "real": f"real:{data}"})
    settings = [(scheme, w, a, source) for scheme in schemes for w, a in BITS for source in SOURCES]
    settings += [(scheme, w, a, source) for scheme in schemes for w, a in LOW_BITS for source in calib
                 if source not in SOURCES]
    for scheme, w, a, source in settings:
        started = time.perf_counter()
        job = QuantizeJob(loaded.spec, calib[source], data, QuantConfig(w, a, scheme=scheme), calib_size=BATCH, seed=seed)
        qmodel, _ = calibrate(loaded, job, torch_device)
        top1 = evaluate(qmodel, val, torch_device)["top1"]
        results[f"{scheme}-w{w}a{a}-{source}"] = top1
        print(f"seed {seed} {scheme} W{w}A{a} {source}: {top1:.2f}% ({time.perf_counter() - started:.1f} s)", flush=True)
    target.write_text(json.dumps(results, indent=2))
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def counts(values: list[int]) -> str:
    """Image counts: one number, or each seed's where they differ (equal-time pools)."""
    return str(values[0]) if len(set(values)) == 1 else " / ".join(map(str, values))


def report(out: Path, teacher: Path, student: Path, seeds: list[int], quant: dict, kt: dict, commands: list[dict],
           schemes: list[str]) -> dict:
    pools = {(s, name): summary(out / f"seed-{s}" / name) for s in seeds for name in POOLS}
    teacher_summary, student_summary = summary(teacher), summary(student)
    fp32 = quant[seeds[0]]["fp32_top1"]
    lines = [
        f"Teacher: ViT ({MODEL_ARGS}) trained by `smi teacher train` on all ten classes: top-1 "
        f"{teacher_summary['top1']:.2f}% on the Fashion-MNIST test set ({teacher_summary['seconds'] / 60:.1f} min). "
        f"Student backbone: the same ViT trained on classes 0-4 only ({student_summary['top1']:.2f}% on their test images, "
        f"{student_summary['seconds'] / 60:.1f} min). Seeds {', '.join(map(str, seeds))}: mean ± std.",
        "",
        f"smi, pri-frozen and random-drop at the schedule {SPARSE}; pri-vV and random-vV emit at every:V (64 // V "
        "trajectories a batch); `-equal-time`: as many batches as fit in the dense pool's inversion time. Per pool: "
        "images, inversion time, images per second, patches per image, the teacher's "
        "accuracy on the pool under its keep masks, quantised top-1 calibrated on it (repq: RepQ-ViT), and the "
        "knowledge-transfer student's best top-1 (the seed's protocol, `smi distill --recipe seed`), on the 10,000 "
        f"test images (fp32 teacher {fp32:.2f}%); `=`: an equal-time pool calibrates on the same 64 images as its "
        "equal-budget twin:",
        "",
        "| pool | images | inversion time (s) | images/s | per image vs dense | patches per image | teacher acc. on pool (%) | "
        + " | ".join(f"{scheme} W{w}A{a}" for scheme in schemes for w, a in LOW_BITS) + " | KT student top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(schemes) * len(LOW_BITS) + 1),
    ]
    dense_rate = [pools[(s, "dense")]["images_per_second"] for s in seeds]
    for name in POOLS:
        runs = [pools[(s, name)] for s in seeds]
        speedup = "" if name == "noise" else cell([r["images_per_second"] / d for d, r in zip(dense_rate, runs)]) + "x"
        per_image = "/".join(str(n) for n in dict.fromkeys(runs[0]["patches_per_image"]))
        quantised = " | ".join("=" if name.endswith("-equal-time") else cell([quant[s][f"{scheme}-w{w}a{a}-{name}"] for s in seeds])
                               for scheme in schemes for w, a in LOW_BITS)
        lines.append(f"| {name} | {counts([r['images'] for r in runs])} | {cell([r['seconds'] for r in runs])} | "
                     f"{cell([r['images_per_second'] for r in runs])} | {speedup} | "
                     f"{per_image}/{runs[0]['num_patches']} | {cell([100 * r['teacher_accuracy'] for r in runs])} | "
                     f"{quantised} | {cell([kt[(s, name)]['best_top1'] for s in seeds])} |")
    lines += ["", f"Quantised top-1 (%) on the 10,000 test images (fp32 {fp32:.2f}%), {BATCH} calibration images:", "",
              "| scheme | W/A | " + " | ".join(SOURCES) + " |", "|---|---|" + "---:|" * len(SOURCES)]
    for scheme in schemes:
        for w, a in BITS:
            row = " | ".join(cell([quant[s][f"{scheme}-w{w}a{a}-{source}"] for s in seeds]) for source in SOURCES)
            lines.append(f"| {scheme} | W{w}A{a} | {row} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    results = {"teacher": teacher_summary, "student_backbone": {k: v for k, v in student_summary.items() if k != "history"},
               "pools": {f"{name}-seed{s}": p for (s, name), p in pools.items()}, "commands": commands,
               "quantize": {f"seed{s}": q for s, q in quant.items()},
               "distill": {f"{name}-seed{s}": {k: v for k, v in r.items() if k != "history"} for (s, name), r in kt.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(out, seeds, pools, quant, kt, schemes)
    return results


def plot(out: Path, seeds: list[int], pools: dict, quant: dict, kt: dict, schemes: list[str]) -> None:
    """Accuracy against inversion time: one panel per downstream result, every pool on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"noise": "tab:gray", "dense": "black", "smi": "tab:blue", "pri-frozen": "tab:pink", "random-drop": "olive",
               "pri-v2": "salmon", "pri-v4": "tab:red", "pri-v7": "darkred",
               "random-v2": "lightgreen", "random-v4": "tab:green", "random-v7": "darkgreen"}
    panels = [(f"{scheme} W{w}A{a}", lambda s, n, key=f"{scheme}-w{w}a{a}-": quant[s][key + n])
              for scheme in schemes[-1:] for w, a in LOW_BITS]
    panels.append(("knowledge transfer (seed protocol)", lambda s, n: kt[(s, n)]["best_top1"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharex=True)
    for ax, (title, value) in zip(axes, panels):
        for name in POOLS:
            base = name.removesuffix("-equal-time")
            x = mean_std([pools[(s, name)]["seconds"] for s in seeds])
            y = mean_std([value(s, name if title.startswith("knowledge") else base) for s in seeds])
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], color=colours[base], capsize=3,
                        marker="D" if name.endswith("-equal-time") else "o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("inversion time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on Fashion-MNIST test (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside, covering no point
    fig.suptitle(f"Accuracy against inversion time, every selection (mean ± std, {len(seeds)} seeds; diamonds: "
                 "equal time to dense)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "accuracy-vs-time.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
