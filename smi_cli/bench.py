"""``smi bench``: dense against sparse inversion speed, side by side, with the FLOP bound."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from smi_cli import options as o
from smi_cli.console import print_json, stderr
from smi_engine.bench import BenchConfig, run_benchmark
from smi_engine.files import check_writable, write_json
from smi_engine.models import parse_model_args


def bench(
    model: Annotated[str, typer.Option(help="timm model (random weights: speed does not depend on them).")] = "deit_tiny_patch16_224",
    model_args: o.ModelArgs = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    iterations: Annotated[int, typer.Option(help="Iterations per run.")] = 400,
    schedule: Annotated[Optional[str], typer.Option(help="Stops; default: the seed's 50,100,200,300 @ 0.3 scaled from 4000 iterations.")] = None,
    repeats: Annotated[int, typer.Option(help="Alternating dense/sparse rounds; medians are reported.")] = 1,
    attention: Annotated[str, typer.Option(help="fused or explicit attention.")] = "fused",
    device: o.Device = "cpu",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Also measure the memory of a steady-state iteration per mode.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the full results as JSON here.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Measure dense vs sparse inversion: per-stage iteration time, end-to-end speedup, bound."""
    config = BenchConfig(model=model, model_args=parse_model_args(model_args), batch_size=batch_size,
                         iterations=iterations, schedule=schedule, repeats=repeats, device=device, attention=attention,
                         memory=memory)
    config.validate()
    if out is not None:
        check_writable(out, "--out", folder=False)
    result = run_benchmark(config, progress=lambda m: stderr.print(f"[dim]{m}[/]"))
    if out is not None:
        write_json(out, result)
    if json_output:
        print_json(result)
    else:
        print_report(result)


def print_report(result: dict) -> None:
    cfg = result["config"]
    table = Table(title=f"{cfg['model']} · batch {cfg['batch_size']} · {cfg['iterations']} iterations · "
                        f"{result['device']} ({result['threads']} threads) · schedule {cfg['schedule']}")
    for column in ("stage", "kept patches", "tokens", "iterations", "ms / iteration", "speedup vs dense", "token-FLOP speedup"):
        table.add_column(column, justify="right")
    table.add_row("dense", "all", str(result["stages"][0]["tokens"]), str(cfg["iterations"]),
                  f"{result['dense_ms_per_iteration']:.1f}", "1.00x", "1.00x")
    for index, stage in enumerate(result["stages"]):
        table.add_row(str(index), str(stage["kept"]), str(stage["tokens"]), str(stage["iterations"]),
                      f"{stage['ms_per_iteration']:.1f}", f"{stage['speedup']:.2f}x", f"{stage['flop_speedup']:.2f}x")
    console = Console()
    console.print(table)
    console.print(
        f"end to end: dense {result['dense_seconds']:.1f} s, sparse {result['sparse_seconds']:.1f} s -> "
        f"[bold]{result['speedup']:.2f}x[/]; token-FLOP bound {result['bound']:.2f}x; "
        f"efficiency {result['efficiency']:.2f} of the bound"
    )
    memory = result["memory"]
    if memory:
        for key, label in (("saved_for_backward_mb", "activations saved for backward"), ("cuda_peak_mb", "CUDA peak allocated")):
            if key in memory["dense"]:
                dense, sparse = memory["dense"][key], memory["sparse"][key]
                console.print(f"{label} per steady-state iteration: dense {dense:.1f} MB, sparse {sparse:.1f} MB "
                              f"({dense / sparse:.2f}x less)")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
