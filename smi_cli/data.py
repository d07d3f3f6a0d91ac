"""``smi data``: look at a dataset spec, or fetch a public dataset for later offline use."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from smi_cli import options as o
from smi_cli.console import print_json
from smi_cli.help import command, new_app
from smi_engine.errors import SmiError

app = new_app(help="Datasets for teachers, evaluation and calibration.")
FETCHABLE = ("cifar10", "cifar100", "fashion-mnist")


@command(app, "info")
def info(
    spec: Annotated[str, typer.Argument(help="digits, fashion-mnist[:DIR], cifar10:ROOT, cifar100:ROOT or imagefolder:DIR.", metavar="SPEC", show_default=False)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing: the exit status says whether SPEC loads.")] = False,
    json_output: o.Json = False,
) -> None:
    """Split sizes, classes and image shape of a dataset.

    \b
    Examples:
      smi data info digits
      smi data info fashion-mnist:/usr/share/datasets/fashion-mnist --json
    """
    from smi_engine.data import load_data

    splits = load_data(spec)
    image, _ = splits.val[0]
    result = {"data": spec, "train": len(splits.train), "val": len(splits.val), "classes": list(splits.classes),
              "image_shape": list(image.shape)}
    if json_output:
        print_json(result)
    elif not quiet:
        typer.echo(f"{spec}: {result['train']} train / {result['val']} val images, {len(splits.classes)} classes, "
                   f"images {tuple(image.shape)}; classes {', '.join(splits.classes[:10])}{' ...' if len(splits.classes) > 10 else ''}")


@command(app, "fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="cifar10, cifar100 or fashion-mnist.", metavar="NAME", show_default=False)],
    root: Annotated[Path, typer.Argument(help="Folder to download into.", metavar="ROOT", show_default=False)],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Download a public dataset (needs the network), then use it offline.

    torchvision downloads and checks it.

    \b
    Example:
      smi data fetch cifar10 ~/data/c10    # then: --data cifar10:~/data/c10
    """
    if name not in FETCHABLE:
        raise SmiError(f"cannot fetch {name!r}: fetchable datasets are {', '.join(FETCHABLE)}")
    from torchvision import datasets

    fresh = not Path(root).exists()  # a folder this command made is removed again if the download fails
    try:
        if name == "fashion-mnist":
            datasets.FashionMNIST(root, train=True, download=True)
            datasets.FashionMNIST(root, train=False, download=True)
            location = f"fashion-mnist:{Path(root) / 'FashionMNIST' / 'raw'}"
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            cls(root, train=True, download=True)
            cls(root, train=False, download=True)
            location = f"{name}:{root}"
    except (OSError, RuntimeError) as exc:
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SmiError(f"download of {name} failed ({reason}): check the network, or copy the files into {root}") from None
    if not quiet:
        typer.echo(f"fetched; use --data {location}")
