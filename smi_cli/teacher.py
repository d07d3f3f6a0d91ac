"""``smi teacher train``: train or fine-tune the classifier that inversion starts from."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from smi_cli import options as o
from smi_cli.console import fail, print_json, stderr
from smi_cli.help import command, new_app
from smi_cli.progress import DEFAULT_EVERY, TrainingProgress, open_display

app = new_app(help="Teacher models: train or fine-tune a classifier on real data.")


@command(app, "train")
def train(
    data: Annotated[str, typer.Option("--data", help="digits, fashion-mnist[:DIR], cifar10:ROOT, cifar100:ROOT or imagefolder:DIR.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for model.safetensors, smi-model.json and the training log.")],
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
    sink: Annotated[Optional[list[str]], typer.Option("--sink", help="Also send events to this sink, repeatable: tensorboard (built in) or a plugin's.")] = None,
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
    from smi_engine.device import resolve_device
    from smi_engine.errors import SmiError
    from smi_engine.inversion_run import build_sinks
    from smi_engine.models import ModelSpec, load_model
    from smi_engine.rundir import RunDir
    from smi_engine.runlock import RunLock
    from smi_engine.teacher import TrainConfig

    display = open_display(stderr, quiet, progress_every)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         label_smoothing=label_smoothing, flip=flip, shift=shift, seed=seed, limit=limit or None)
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
    run_dir = RunDir(out)
    run_config = {"model": spec.to_dict(), "data": data, "train": config.to_dict()}
    sinks = build_sinks(sink or [], run_dir, run_config)  # a sink that cannot start fails before anything is written
    run_dir.check_claimable("teacher")
    with RunLock(out):
        run_dir.create({"config": run_config, "created": dt.datetime.now().isoformat(timespec="seconds")}, "teacher")
        _train(run_dir, loaded, spec, splits, config, data, epochs, torch_device, display, sinks, quiet, json_output)


def _train(run_dir, loaded, spec, splits, config, data: str, epochs: int, torch_device, display, sinks: list,
           quiet: bool, json_output: bool) -> None:
    from smi_cli.signals import stop_on_signals
    from smi_engine.control import RunControl, RunInterrupted
    from smi_engine.events import EventBus, JsonlSink
    from smi_engine.files import write_json
    from smi_engine.models import save_model
    from smi_engine.teacher import train_classifier

    out = run_dir.path
    control = RunControl(run_dir)
    bus = EventBus([JsonlSink(run_dir.events), TrainingProgress(display, "train", "epoch"), *sinks])
    bus.emit("run_start", kind="teacher", pid=os.getpid(), host=socket.gethostname(), model=spec.name, data=data,
             epochs=epochs, device=str(torch_device))
    try:
        with stop_on_signals(control, stderr), display:
            metrics = train_classifier(loaded, splits, config, torch_device, bus, control)
        save_model(out, loaded, {"data": data, "accuracy": {"top1": metrics["top1"], "top5": metrics["top5"]}})
        summary = {"model_dir": str(out), "model": spec.name, "data": data, **metrics}
        write_json(run_dir.summary, summary)
        bus.emit("run_end", summary=summary)
    except RunInterrupted as exc:
        bus.emit("run_interrupted", message=str(exc))
        fail(f"{exc}; nothing saved (training restarts from scratch)", code=130)
    except Exception as exc:  # the log says how the run ended: failed, not dead
        bus.emit("run_error", message=str(exc) or type(exc).__name__, error=type(exc).__name__)
        raise
    finally:
        bus.close()
    if json_output:
        print_json(summary)
    elif not quiet:
        stderr.print(f"[bold green]saved[/] {out}  val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['seconds']:.0f} s)", soft_wrap=True)
