"""``smi bench``: dense inversion against selection policies and schedules, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import markup_safe, print_json, show, stderr, stdout
from smi_cli.help import command


def bench(
    model: Annotated[str, typer.Option(help="timm model (random weights: speed does not depend on them).")] = "deit_tiny_patch16_224",
    model_args: o.ModelArgs = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    iterations: Annotated[int, typer.Option(help="Iterations per run.")] = 400,
    schedule: Annotated[Optional[str], typer.Option(help="Stops of the compared runs (default: the seed's 50,100,200,300 @ 0.3 scaled from 4000 iterations).", show_default=False)] = None,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="A sparse run to time against dense: a selection NAME, or NAME@SCHEDULE for its own stops; repeatable (default: smi).", show_default=False)] = None,
    repeats: Annotated[int, typer.Option(help="Rounds of the side-by-side timing; medians are reported.")] = 1,
    attention: Annotated[str, typer.Option(help="fused or explicit attention.")] = "fused",
    precision: o.Precision = "fp32",
    compile: o.Compile = False,
    device: o.Device = "cpu",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Also measure the memory of a steady-state iteration per run.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the full results as JSON to this file.", show_default=False)] = None,
    quiet: o.Quiet = False,
    json_output: o.Json = False,
) -> None:
    """Time dense inversion against sparse runs, side by side.

    Per stage and phase, end to end, and against the token-FLOP bound.

    \b
    Example: SMI and Patch Rebirth at the seed's schedule, PRI at a steeper one
      smi bench --compare smi --compare pri --compare pri@20:0.5,40:0.5,80:0.5
    """
    from smi_engine.inversion.bench import BenchConfig, run_benchmark
    from smi_engine.files import check_writable, write_json
    from smi_engine.models import parse_model_args

    config = BenchConfig(model=model, model_args=parse_model_args(model_args), batch_size=batch_size,
                         iterations=iterations, schedule=schedule, compare=list(compare or ["smi"]), repeats=repeats,
                         device=device, attention=attention, precision=precision, compile=compile, memory=memory)
    config.validate()
    if out is not None:
        check_writable(out, "--out", folder=False)
    result = run_benchmark(config, progress=(lambda m: None) if quiet else (lambda m: stderr.print(f"[dim]{m}[/]", soft_wrap=True)))
    if out is not None:
        write_json(out, result)
    if json_output:
        print_json(result)
    elif not quiet:
        print_report(result)


PHASE_HEADERS = {"forward": "fwd", "backward": "bwd", "optimizer": "opt", "reporting": "rep"}
CAPTION = ("one row per stage; speedup: dense iteration time / this stage's; FLOPs: the same ratio of token FLOPs; "
           "fwd/bwd/opt/rep: ms per iteration in the forward (teacher, losses, stops), backward, "
           "optimiser (Adam, clamp) and reporting")


def print_report(result: dict) -> None:
    from rich import box
    from rich.table import Table

    from smi_engine.inversion.bench import DENSE
    from smi_engine.inversion.batch import PHASES

    cfg = result["config"]
    console = stdout
    profiled = result["runs"][DENSE]["stages"][0]["phase_ms"] is not None
    table = Table(title=f"{cfg['model']} · batch {cfg['batch_size']} · {cfg['iterations']} iterations · "
                        f"{result['device']} ({result['threads']} threads) · {cfg['precision']}"
                        f"{' · compiled' if cfg['compile'] else ''}")
    table.box, table.caption = box.SIMPLE_HEAD, CAPTION if profiled else None
    table.padding = (0, 0)  # the box already separates columns by a space: 80 columns fit
    columns = ["run", "kept", "tokens", "its", "ms/it", "speedup", "FLOPs"]
    columns += [PHASE_HEADERS[phase] for phase in PHASES] if profiled else []
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=True)
    for label, run in result["runs"].items():
        for index, stage in enumerate(run["stages"]):
            cells = [label if index == 0 else "", str(stage["kept"]), str(stage["tokens"]),
                     str(stage["iterations"]), f"{stage['ms_per_iteration']:.1f}", f"{stage['speedup']:.2f}x",
                     f"{stage['flop_speedup']:.2f}x"]
            if profiled:
                cells += [f"{stage['phase_ms'][phase]:.1f}" for phase in PHASES]
            table.add_row(*cells, end_section=index == len(run["stages"]) - 1)
    show(table)
    for label, run in result["runs"].items():
        if label == DENSE:
            console.print(f"dense: {result['dense_seconds']:.1f} s end to end, {run['images_per_second']:.2f} images/s")
            continue
        per = f" per image ({run['images_per_trajectory']} a trajectory)" if run["images_per_trajectory"] > 1 else ""
        console.print(f"{markup_safe(label)} ({markup_safe(run['schedule'])}): {run['seconds']:.1f} s, {run['images_per_second']:.2f} images/s "
                      f"-> [bold]{run['speedup']:.2f}x[/] vs dense{per}; token-FLOP bound {run['bound']:.2f}x; "
                      f"efficiency {run['efficiency']:.2f} of the bound", soft_wrap=True)
    memory = result["memory"]
    if memory:
        for key, label in (("saved_for_backward_mb", "activations saved for backward"), ("cuda_peak_mb", "CUDA peak allocated")):
            if key in memory[DENSE]:
                parts = ", ".join(f"{run} {values[key]:.1f} MB" for run, values in memory.items())
                console.print(f"{label} per steady-state iteration: {parts}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    command(app, "bench")(bench)
