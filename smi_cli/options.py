"""Options shared by several commands, and turning them into engine objects.

Nothing here imports torch: ``smi --help`` and shell completion load every command's options.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from smi_engine.errors import SmiError

if TYPE_CHECKING:
    from smi_cli.config_file import FromRun
    from smi_engine.models import ModelSpec

def installed(kind: str):
    """Shell completion of a plugin kind's names (losses, selections, schemes), built-ins and
    installed plugins alike; the registry (and torch) loads only when such a value is completed."""
    def complete(incomplete: str) -> list[str]:
        from smi_engine.plugins import get_registry

        return [name for name in sorted(get_registry().entries[kind]) if name.startswith(incomplete)]
    return complete


DEVICES = ("auto", "cpu", "cuda")


def complete_device(incomplete: str) -> list[str]:
    return [d for d in DEVICES if d.startswith(incomplete)]


# Help sections (smi_cli.help prints one per name; the rest go under "Options").
MODEL, RUN, OUTPUT = "Model options", "Run options", "Output options"

Model = Annotated[Optional[str], typer.Option("--model", help="timm model name, e.g. deit_tiny_patch16_224.", rich_help_panel=MODEL)]
ModelArgs = Annotated[Optional[str], typer.Option("--model-args", help="timm keyword arguments, e.g. img_size=32,patch_size=4,num_classes=10.", rich_help_panel=MODEL)]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="Start from timm's pretrained weights (needs the network).", rich_help_panel=MODEL)]
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="A plain state_dict (.safetensors, .pth, .pt, .bin).", rich_help_panel=MODEL)]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Normalisation mean per channel, e.g. 0.5 or 0.485,0.456,0.406 (default: timm's data config).", rich_help_panel=MODEL)]
Std = Annotated[Optional[str], typer.Option("--std", help="Normalisation std per channel (default: timm's data config).", rich_help_panel=MODEL)]
Teacher = Annotated[Optional[Path], typer.Option("--teacher", help="A model folder from `smi teacher train` (instead of --model ...).", rich_help_panel=MODEL)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", autocompletion=complete_device)]

# The same output flags on every command.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary on the terminal (errors still show).", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress stays on stderr).", rich_help_panel=OUTPUT)]
ProgressEvery = Annotated[float, typer.Option(
    "--progress-every", envvar="SMI_PROGRESS_EVERY", metavar="SECONDS",
    help="When stderr is not a terminal (a log file, nohup, SLURM): seconds between plain progress lines.",
    rich_help_panel=OUTPUT)]

Sink = Annotated[Optional[list[str]], typer.Option("--sink", autocompletion=installed("sinks"), help="Also send events to this sink, repeatable: tensorboard (built in; pip install 'smi-toolkit[tensorboard]') or a plugin's.", rich_help_panel=OUTPUT)]
SinkOption = Annotated[Optional[list[str]], typer.Option("--sink-option", help="NAME.KEY=VALUE for a sink's factory, repeatable, e.g. tensorboard.every=10.", rich_help_panel=OUTPUT)]

Selection = Annotated[str, typer.Option("--selection", autocompletion=installed("selections"), help="Which patches leave the optimised set at each stop: smi (least attended, dropped), pri (Patch Rebirth: most attended, kept frozen), random, or a plugin's (see `smi plugins`).", rich_help_panel=RUN)]
SelectionOption = Annotated[Optional[list[str]], typer.Option("--selection-option", help="NAME.KEY=VALUE for the selection's factory, repeatable, e.g. pri.keep_remaining=false.", rich_help_panel=RUN)]
Precision = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16: autocast of the teacher's forward and backward (pixels and Adam state stay fp32; fp16 scales the loss).", rich_help_panel=RUN)]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the teacher's blocks (one graph per stage's token count; pays off on long GPU runs).", rich_help_panel=RUN)]


def sink_options(sinks: list[str] | None, texts: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--sink-option NAME.KEY=VALUE`` texts by the ``--sink`` they are for."""
    from smi_engine.plugins import plugin_options

    typed = plugin_options("sinks", texts, sinks or [], args=(None, None))  # a sink's factory takes (run_dir, config, ...)
    return {name: options for name, options in typed.items() if options}


def config_option(kind: str, from_run: "FromRun") -> Any:
    """``--config FILE`` for a command that writes runs of ``kind`` (see ``smi_cli.config_file``)."""
    from smi_cli.config_file import config_callback

    return Annotated[Optional[Path], typer.Option(
        "--config", metavar="FILE", is_eager=True, callback=config_callback(kind, from_run), show_default=False,
        help="Options from a TOML file (KEY = VALUE, named as here) or from a run's config.json (same run again); "
             "options given on the command line win.")]


def model_spec(
    model: str | None, model_args: str | None, pretrained: bool, checkpoint: Path | None,
    mean: str | None, std: str | None, teacher: Path | None, role: str = "--model",
) -> "ModelSpec":
    """One ModelSpec from either a model folder or the raw --model/... options."""
    from smi_engine.models import ModelSpec, parse_floats, parse_model_args

    if teacher is not None:
        if model or model_args or checkpoint or pretrained:
            raise SmiError("--teacher already names the model: drop --model/--model-args/--checkpoint/--pretrained")
        spec = ModelSpec.from_dir(teacher)
        overrides = {k: v for k, v in (("mean", parse_floats(mean)), ("std", parse_floats(std))) if v is not None}
        return ModelSpec.from_dict({**spec.to_dict(), **overrides}) if overrides else spec
    if not model:
        raise SmiError(f"no model given: pass {role} NAME (a timm model) or --teacher DIR")
    return ModelSpec(
        name=model, args=parse_model_args(model_args), pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None, mean=parse_floats(mean), std=parse_floats(std),
    )

