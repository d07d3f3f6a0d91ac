"""``smi teacher train``: train or fine-tune the classifier that inversion starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smi_cli import options as o
from smi_cli.config_file import model_options, sink_flags
from smi_cli.console import markup_safe, print_json, stderr, stopped
from smi_cli.help import command, new_app
from smi_cli.progress import DEFAULT_EVERY, TrainingProgress, open_display
from smi_engine.errors import SmiError

app = new_app(help="Teacher models: train or fine-tune a classifier on real data.")


def options_from_run(config: dict) -> dict:
    """A teacher training's config.json as ``smi teacher train`` options."""
    spec = dict(config["model"])
    spec.pop("classes", None)  # they come from the data again
    train = dict(config.get("train", {}))
    if train.pop("warmup_epochs", 1.0) != 1.0:
        raise SmiError("this run set warmup_epochs, which smi teacher train has no option for: set it in Python")
    train.pop("limit", None)
    sinks = sink_flags(train.pop("sinks", []), train.pop("sink_options", None))
    return {**model_options(spec), **train, "data": config["data"], "limit": config.get("train", {}).get("limit") or 0,
            **sinks}


ConfigFile = o.config_option("teacher", options_from_run)


@command(app, "train")
def train(
    data: Annotated[str, typer.Option("--data", help="digits, fashion-mnist[:DIR], cifar10:ROOT, cifar100:ROOT or imagefolder:DIR.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for model.safetensors, smi-model.json and the training log.")],
    config_file: ConfigFile = None,
    model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (cosine decay after warm-up).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = 0.1,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips (off for digits).")] = True,
    shift: Annotated[float, typer.Option(help="Random translation, fraction of the image size.")] = 0.125,
    limit: Annotated[int, typer.Option(help="Use only the first N training images (0: all).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    sink: o.Sink = None,
    sink_option: o.SinkOption = None,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Train a timm classifier on real data.

    Saves a model folder that --teacher DIR loads.

    \b
    Example:
      smi teacher train --data fashion-mnist --model vit_tiny_patch16_224 \\
        --model-args img_size=32,patch_size=4,in_chans=1 --out runs/teacher
    """
    from smi_engine.data import load_data
    from smi_engine.runtime.device import resolve_device
    from smi_engine.errors import SmiError
    from smi_engine.models import ModelSpec, load_model
    from smi_cli.signals import stop_on_signals
    from smi_engine.runs.control import RunControl, RunInterrupted
    from smi_engine.runs.rundir import RunDir
    from smi_engine.downstream.teacher import TrainConfig, run_teacher_training

    display = open_display(stderr, quiet, progress_every)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         label_smoothing=label_smoothing, flip=flip, shift=shift, seed=seed, limit=limit or None,
                         sinks=list(sink or []), sink_options=o.sink_options(sink, sink_option))
    config.validate()
    splits = load_data(data)
    spec = o.model_spec(model, model_args, pretrained, checkpoint, mean, std, None)
    if "num_classes" not in spec.args and not checkpoint:
        spec = ModelSpec.from_dict({**spec.to_dict(), "args": {**spec.args, "num_classes": splits.num_classes}})
    spec = ModelSpec.from_dict({**spec.to_dict(), "classes": list(splits.classes)})
    torch_device = resolve_device(device)
    import torch

    torch.manual_seed(seed)
    loaded = load_model(spec, torch_device, frozen=False)
    if loaded.num_classes != splits.num_classes:
        raise SmiError(f"the model has {loaded.num_classes} classes but {data} has {splits.num_classes}: pass --model-args num_classes={splits.num_classes}")
    control = RunControl(RunDir(out))
    try:
        with stop_on_signals(control, stderr, "stopping after this step; nothing is saved"), display:
            summary = run_teacher_training(loaded, splits, config, out, torch_device,
                                           [TrainingProgress(display, "train", "epoch")], control)
    except RunInterrupted as exc:
        stopped(f"{exc}; nothing saved (training restarts from scratch)")
    if json_output:
        print_json(summary)
    elif not quiet:
        stderr.print(f"[bold green]saved[/] {markup_safe(out)}  val top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  "
                     f"({summary['seconds']:.0f} s)", soft_wrap=True)
