"""``smi eval``: top-1/top-5 of a model on real data."""

from __future__ import annotations

from typing import Annotated

import typer

from smi_cli import options as o
from smi_cli.console import plain, print_json, stderr
from smi_cli.help import command
from smi_cli.progress import DEFAULT_EVERY, PhaseProgress, open_display


def evaluate(
    data: Annotated[str, typer.Option("--data", help="digits, fashion-mnist[:DIR], cifar10:ROOT, cifar100:ROOT or imagefolder:DIR.")],
    teacher: o.Teacher = None, model: o.Model = None, model_args: o.ModelArgs = None, pretrained: o.Pretrained = False,
    checkpoint: o.Checkpoint = None, mean: o.Mean = None, std: o.Std = None,
    limit: Annotated[int, typer.Option(help="Evaluate at most N images (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
    json_output: o.Json = False,
    progress_every: o.ProgressEvery = DEFAULT_EVERY,
) -> None:
    """Accuracy of a model on real validation data.

    \b
    Examples:
      smi eval --teacher runs/teacher --data fashion-mnist
      smi eval --teacher runs/w4a4 --data fashion-mnist --limit 1000 --json
    """
    from smi_engine.checks import at_least
    from smi_engine.data import ModelInput, check_fits, load_data, loader
    from smi_engine.runtime.device import resolve_device
    from smi_engine.downstream.evaluate import evaluate as run_evaluate
    from smi_engine.models import load_model

    at_least("--limit", limit, 0, 1000)
    at_least("--batch-size", batch_size, 1, 256)
    display = open_display(stderr, quiet, progress_every)
    torch_device = resolve_device(device)
    loaded = load_model(o.model_spec(model, model_args, pretrained, checkpoint, mean, std, teacher), torch_device)
    splits = load_data(data)
    check_fits(loaded.spec.name, loaded.num_classes, loaded.spec.classes, splits, data)
    batches = loader(splits.val, ModelInput.for_model(loaded.model, loaded.normalizer), batch_size)
    phases = PhaseProgress(display)
    with display:
        metrics = run_evaluate(loaded.model, batches, torch_device, limit or None,
                               lambda done, total: phases.advance("eval", done, total))
    quantization = loaded.spec.quantization
    result = {"model": loaded.spec.name, "data": data, "quantization": quantization, **metrics}
    if json_output:
        print_json(result)
    elif not quiet:
        name = loaded.spec.name + (f" ({quantization['scheme']} W{quantization['w_bit']}A{quantization['a_bit']}, fake-quantised)"
                                   if quantization else "")
        typer.echo(plain(f"{name} on {data}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['images']} images)"))


def register(app: typer.Typer) -> None:
    command(app, "eval")(evaluate)
