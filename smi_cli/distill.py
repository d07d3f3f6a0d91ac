"""``smi distill``: data-free knowledge transfer from a teacher to a student."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.config_file import inversion_options, model_options, sink_flags
from smi_cli.console import print_json, stderr, stopped
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, InversionProgress, TrainingProgress, open_display

STUDENT, SYNTH, ROUNDS = "Student options", "Synthesis options (with --synthesize)", "Training rounds"


def options_from_run(config: dict) -> dict:
    """A distillation's config.json as ``smi distill`` options (the recipe is already resolved)."""
    config = dict(config)
    student, synthesis = config.pop("student"), config.pop("synthesize")
    options = {**model_options(config.pop("teacher")), "pool": config.pop("pools"),
               **sink_flags(config.pop("sinks"), config.pop("sink_options", None)),
               "limit": config.pop("limit") or 0, **{k: v for k, v in config.items() if v is not None}}
    student_options = model_options(student)
    if "teacher" in student_options:  # a model folder
        options["student"] = student_options["teacher"]
    else:
        options.update(student=student_options["model"], student_args=student_options.get("model_args", {}),
                       student_pretrained=student_options.get("pretrained", False))
        options.update({"student_checkpoint": student_options["checkpoint"]} if "checkpoint" in student_options else {})
    if synthesis is not None:
        options.update(synthesize=True, schedule=synthesis["schedule"], iterations=synthesis["iterations"],
                       synth_batch_size=synthesis["batch_size"], inversion_lr=synthesis["lr"],
                       **inversion_options(synthesis["losses"], synthesis["selection"]))
    return options


ConfigFile = o.config_option("distill", options_from_run)


def distill(
    data: Annotated[str, typer.Option("--data", help="Real validation data, e.g. fashion-mnist.")],
    student: Annotated[str, typer.Option("--student", help="Student: a timm model name, or a model folder.", rich_help_panel=STUDENT)],
    config_file: ConfigFile = None,
    teacher: o.Teacher = None, model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None,
    recipe: Annotated[str, typer.Option(help="Named defaults: default, or seed (the seed's test_kt.py: linear probe, SGD 0.1 constant, T 20, 1,000 rounds of one synthesised batch of 100 and one step on 32 drawn images). Options given explicitly win.", rich_help_panel=ROUNDS)] = "default",
    student_args: Annotated[Optional[str], typer.Option("--student-args", help="timm kwargs of the student.", rich_help_panel=STUDENT)] = None,
    student_pretrained: Annotated[bool, typer.Option("--student-pretrained", help="Start the student from timm's pretrained weights.", rich_help_panel=STUDENT)] = False,
    student_checkpoint: Annotated[Optional[Path], typer.Option("--student-checkpoint", help="Start the student from this state_dict.", rich_help_panel=STUDENT)] = None,
    linear_probe: Annotated[Optional[bool], typer.Option("--linear-probe/--full-training", help="Train only a new classifier head on the frozen student (the seed's setting), or every weight.", show_default=False, rich_help_panel=STUDENT)] = None,
    pool: Annotated[Optional[list[str]], typer.Option("--pool", help="A run directory of `smi invert` to learn from, repeatable.")] = None,
    grow: Annotated[Optional[int], typer.Option("--grow", help="Reveal the --pool images N per round, as if synthesised then (the seed recipe: one inverted batch per round).", show_default=False, rich_help_panel=ROUNDS)] = None,
    synthesize: Annotated[bool, typer.Option("--synthesize", help="Invert fresh batches every round (settings below).")] = False,
    schedule: Annotated[str, typer.Option(help="Stopping schedule for --synthesize.", rich_help_panel=SYNTH)] = "dense",
    selection: Annotated[str, typer.Option("--selection", autocompletion=o.installed("selections"), help="Selection policy for --synthesize: smi, pri, random or a plugin's.", rich_help_panel=SYNTH)] = "smi",
    selection_option: Annotated[Optional[list[str]], typer.Option("--selection-option", help="NAME.KEY=VALUE for the selection, repeatable.", rich_help_panel=SYNTH)] = None,
    iterations: Annotated[int, typer.Option(help="Inversion iterations per batch.", rich_help_panel=SYNTH)] = 4000,
    synth_batch_size: Annotated[Optional[int], typer.Option(help="Images per synthesised batch (default: 32; seed recipe 100).", show_default=False, rich_help_panel=SYNTH)] = None,
    synth_batches: Annotated[Optional[int], typer.Option(help="Batches synthesised per round (default: 1).", show_default=False, rich_help_panel=SYNTH)] = None,
    inversion_lr: Annotated[float, typer.Option("--inversion-lr", help="Adam learning rate on the pixels.", rich_help_panel=SYNTH)] = 0.25,
    loss: Annotated[Optional[list[str]], typer.Option("--loss", autocompletion=o.installed("losses"), help="Inversion losses NAME[:WEIGHT].", rich_help_panel=SYNTH)] = None,
    loss_option: Annotated[Optional[list[str]], typer.Option("--loss-option", help="NAME.KEY=VALUE.", rich_help_panel=SYNTH)] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random flips (in inversion and of the training images) (default: on).", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "--rounds", help="Rounds of training (default: 10; seed recipe 1000).", show_default=False, rich_help_panel=ROUNDS)] = None,
    steps_per_round: Annotated[Optional[int], typer.Option(help="Steps per round, each on --batch-size images drawn from all synthetic data so far (default: one pass over it; seed recipe 1).", show_default=False, rich_help_panel=ROUNDS)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step (default: 64; seed recipe 32).", show_default=False, rich_help_panel=ROUNDS)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or sgd (momentum 0.9) (default: adamw; seed recipe sgd).", show_default=False, rich_help_panel=ROUNDS)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Student learning rate (default: 1e-3; seed recipe 0.1).", show_default=False, rich_help_panel=ROUNDS)] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="cosine (over the rounds) or constant (default: cosine; seed recipe constant).", show_default=False, rich_help_panel=ROUNDS)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default: 1e-4).", show_default=False, rich_help_panel=ROUNDS)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softening temperature T of the KL loss (default: 20, the seed's).", show_default=False, rich_help_panel=ROUNDS)] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate every N rounds (and after the last) (default: 1).", show_default=False, rich_help_panel=ROUNDS)] = None,
    limit: Annotated[int, typer.Option(help="Validate on at most N images (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    sink: o.Sink = None,
    sink_option: o.SinkOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/TIME-distill).", show_default=False)] = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Train a student from the teacher on synthetic images.

    The student learns the teacher's outputs on synthetic images only; real data is used for
    validation alone.

    \b
    Example: the seed's protocol, a pre-inverted pool revealed a batch per round
      smi distill --recipe seed --teacher runs/teacher \\
        --student runs/student-0-4 --pool runs/sparse --data fashion-mnist
    """
    from smi_cli.signals import stop_on_signals
    from smi_engine.runtime import distributed
    from smi_engine.runs.control import RunControl, RunInterrupted
    from smi_engine.downstream.distill import DistillConfig, resolve_grow, resolve_recipe, run_distillation
    from smi_engine.inversion.config import InversionConfig
    from smi_engine.inversion.losses import LossSpec, attach_options
    from smi_engine.checks import parse_pairs
    from smi_engine.models import ModelSpec
    from smi_engine.runs.rundir import RunDir
    from smi_engine.inversion.schedule import Schedule
    from smi_engine.inversion.selection import SelectionSpec

    display = open_display(stderr, quiet, progress_every)
    teacher_spec = o.model_spec(model, model_args, pretrained, checkpoint, mean, std, teacher)
    if Path(student).is_dir():
        student_spec = ModelSpec.from_dir(student)
    else:
        student_spec = ModelSpec(student, parse_pairs(student_args, "--student-args", "img_size=32,patch_size=4"),
                                 student_pretrained,
                                 str(student_checkpoint) if student_checkpoint else None)
    settings = resolve_recipe(recipe, {
        "synth_batches": synth_batches, "synth_batch_size": synth_batch_size, "epochs": epochs,
        "steps_per_round": steps_per_round, "grow": grow, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "lr_schedule": lr_schedule, "weight_decay": weight_decay, "temperature": temperature,
        "linear_probe": linear_probe, "flip": flip, "val_every": val_every,
    })
    synthesis = None
    if synthesize:
        specs = attach_options([LossSpec.parse(t) for t in (loss or ["deepinversion"])], loss_option or [])
        synthesis = InversionConfig(model=teacher_spec, schedule=Schedule.parse(schedule), iterations=iterations,
                                    selection=SelectionSpec.parse(selection, selection_option),
                                    batch_size=settings.get("synth_batch_size") or 32, lr=inversion_lr,
                                    losses=specs, flip=settings.get("flip", True), seed=seed)
    pools = list(map(str, pool or []))
    config = DistillConfig(  # typed all the way: a bad value is named by the option the user wrote
        teacher=teacher_spec, student=student_spec, data=data, pools=pools, synthesize=synthesis,
        grow=resolve_grow(settings.get("grow"), pools, synthesis), seed=seed, limit=limit or None, sinks=list(sink or []),
        sink_options=o.sink_options(sink, sink_option),
        **{k: v for k, v in settings.items() if k in DistillConfig.__dataclass_fields__ and k != "grow"})
    config.validate()
    placement, torch_device = distributed.start(device)
    try:
        out = out or placement.agree(Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-distill")
        control = RunControl(RunDir(out))
        quiet = quiet or not placement.is_main
        sinks = [] if quiet else [TrainingProgress(display, "train", "round")] + (
            [InversionProgress(display, "synthesise")] if synthesize else [])
        with stop_on_signals(control, stderr, "stopping after this step; the best student so far is kept"), display:
            summary = run_distillation(config, out, torch_device, sinks, control, placement)
    except RunInterrupted as exc:
        stopped(f"{exc}; the best student so far is in {out / 'student'}")
    finally:
        distributed.finish()
    if not placement.is_main:
        return
    if json_output:
        print_json(summary)
    elif not quiet:
        typer.echo(f"best student top-1 {summary['best_top1']:.2f}% on {data} after {summary['epochs']} rounds on "
                   f"{summary['synthetic_images']} synthetic images -> {summary['student_dir']}")


def register(app: typer.Typer) -> None:
    command(app, "distill")(distill)
