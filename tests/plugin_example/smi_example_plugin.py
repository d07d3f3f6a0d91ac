"""An example third-party smi plugin, exactly as README documents it."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import typer

from smi_engine import ActivationQuantizer, QuantLinear, hookimpl, load_pool


class Brightness:
    """Pulls the mean pixel of the kept patches towards a target brightness (in [0, 1])."""

    def __init__(self, target: float = 0.5):          # options: --loss-option brightness.target=0.3
        self.target = target

    def __call__(self, state):                          # state: smi_engine.inversion.losses.LossState
        mean = torch.tensor(state.normalizer.mean, device=state.patches.device)
        std = torch.tensor(state.normalizer.std, device=state.patches.device)
        channels = state.grid.channels
        pixels = state.patches.view(*state.patches.shape[:2], channels, -1) * std.view(-1, 1) + mean.view(-1, 1)
        return {"gap": (pixels.mean() - self.target).abs()}   # logged as brightness.gap


class CentreFirst:
    """A selection policy: at each stop the patches farthest from the image centre leave, as an image."""

    leaving = "emit"                                    # they make an image of their own ("drop", "freeze")
    keeps_remaining = True                              # the patches inverted to the end make the last one

    def choose(self, stop):                             # stop: smi_engine.inversion.selection.StopContext
        grid = stop.grid
        rows, cols = stop.kept // grid.cols, stop.kept % grid.cols
        distance = (rows - (grid.rows - 1) / 2) ** 2 + (cols - (grid.cols - 1) / 2) ** 2
        return distance.topk(stop.leaving, dim=1).indices   # (B, leaving) positions in stop.kept


class IterationCounter:
    """Counts iteration events and writes the count into the run directory when the run ends."""

    def __init__(self, run_dir, config, file: str = "example-counter.json"):   # --sink-option iteration-counter.file=n.json
        self.path, self.count = Path(run_dir) / Path(file).name, 0

    def __call__(self, event):
        if event["event"] == "iteration":
            self.count += 1

    def close(self):
        self.path.write_text(json.dumps({"iterations": self.count}))


@dataclass
class PoolSize:
    """A task: how many images a pool holds. Its options are its fields, typed (-o pool=runs/x)."""

    description: ClassVar[str] = "count the images of a pool"
    pool: str

    def run(self, context):                             # context: smi_engine.TaskContext
        return {"pool": self.pool, "images": len(load_pool(self.pool))}


class LinearOnly:
    """A quantisation scheme: the weights and inputs of the linear layers; the patch embedding,
    attention's matmuls, LayerNorm, softmax and GELU stay in float."""

    description = "weights and inputs of the linear layers only; attention's matmuls in float"
    default_calibrator = "minmax"                       # or --calibrator percentile|mse|search

    def __init__(self, head: bool = True):              # --scheme-option linear-only.head=false
        self.head = head

    def build(self, model, config):                     # config: smi_engine.QuantConfig
        classifier = model.get_classifier()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and (self.head or child is not classifier):
                    setattr(parent, name, QuantLinear(child, config.w_bit, config.activation()))
        return model                                    # weights stay float: smi rounds them, or learns how

    def finish(self, qmodel, config):                   # after the calibration images went through
        for module in qmodel.modules():
            if isinstance(module, ActivationQuantizer):
                module.finish()                         # fix its range from what it saw


@hookimpl
def register_losses(register):
    register("brightness", Brightness)


@hookimpl
def register_selections(register):
    register("centre", CentreFirst)


@hookimpl
def register_event_sinks(register):
    register("iteration-counter", IterationCounter)


@hookimpl
def register_tasks(register):
    register("pool-size", PoolSize)


@hookimpl
def register_quant_schemes(register):
    register("linear-only", LinearOnly)


@hookimpl
def register_commands(cli):
    @cli.command("example-hello")
    def hello(name: str = "world") -> None:
        """Say hello (added by smi-example-plugin)."""
        typer.echo(f"hello {name} from smi-example-plugin")
