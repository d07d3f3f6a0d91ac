"""``--config FILE``: a command's options from a TOML file or from a run's own ``config.json``.

What the file says becomes the command's defaults, so an option written on the command line
wins over it, and the run's ``config.json`` records the resolved result as always. A TOML file
names options as the command line does (``batch-size = 64`` or ``batch_size = 64``, repeatable
options as lists, ``model-args`` as a table); a run's ``config.json`` is translated by the
command whose kind it is, so ``smi invert --config runs/x/config.json --out runs/y`` makes the
same run again under a new folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from smi_engine.errors import SmiError
from smi_engine.files import read_regular

#: A run's config.json (its ``config``) -> the options of the command that makes such runs.
FromRun = Callable[[dict[str, Any]], dict[str, Any]]


def read_options(path: Path, command: Any, kind: str, from_run: FromRun) -> dict[str, Any]:
    """The options ``path`` sets for ``command``, by parameter name, checked against its options."""
    try:
        text = read_regular(path).decode()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SmiError(f"--config {path} is not readable {'JSON' if path.suffix == '.json' else 'TOML'} "
                       f"({str(exc).splitlines()[0]}): fix the file or pass options on the command line") from None
    if not isinstance(data, dict):
        raise SmiError(f"--config {path} holds no table of options: write KEY = VALUE lines")
    if "kind" in data and isinstance(data.get("config"), dict):  # a run's own config.json
        if data["kind"] != kind:
            raise SmiError(f"--config {path} is the configuration of a {data['kind']!r} run, not of smi {command.name}: "
                           f"pass it to the command that made it")
        data = from_run(data["config"])
    return _check(path, command, data)


def _check(path: Path, command: Any, data: dict[str, Any]) -> dict[str, Any]:
    params = {p.name: p for p in command.params if p.param_type_name == "option" and p.name not in ("config_file", "help")}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        param = params.get(name)
        if param is None or name in NOT_FROM_FILES:
            settable = ", ".join(sorted(n.replace("_", "-") for n in params if n not in NOT_FROM_FILES))
            raise SmiError(f"--config {path} sets {key!r}, which smi {command.name} does not take from a file: "
                           f"use {settable}")
        options[name] = _as_option_value(value, param)
    return options


#: Options that say how to run this process, not what the run is.
NOT_FROM_FILES = {"resume", "tui", "quiet", "json_output", "progress_every"}


def _as_option_value(value: Any, param: Any) -> Any:
    """A TOML or JSON value as the command line would give it: a table as ``k=v,k=v``, a list
    of numbers for a single option as ``a,b``, a single value for a repeatable one as a list."""
    if isinstance(value, dict):
        value = ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in value.items())
    if param.multiple:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def config_callback(kind: str, from_run: FromRun) -> Callable[[Any, Any, Any], Any]:
    """The eager callback of a command's ``--config``: the file's options become the defaults
    of the options that follow (Click reads ``default_map`` for every option not given)."""
    def load(ctx: Any, param: Any, value: Path | None) -> Path | None:
        if value is not None and not ctx.resilient_parsing:
            ctx.default_map = {**(ctx.default_map or {}), **read_options(Path(value), ctx.command, kind, from_run)}
        return value
    return load


def model_options(spec: dict[str, Any]) -> dict[str, Any]:
    """A recorded model spec as the model options: the teacher folder its weights came from,
    where it has one (so its classes come along), else the timm name with its arguments."""
    checkpoint = spec.get("checkpoint")
    if checkpoint and (Path(checkpoint).parent / "smi-model.json").is_file():
        return {"teacher": str(Path(checkpoint).parent)}
    options = {"model": spec["name"], "model_args": spec.get("args") or {}, "pretrained": bool(spec.get("pretrained")),
               "checkpoint": checkpoint}
    options.update({k: list(spec[k]) for k in ("mean", "std") if spec.get(k)})
    return {k: v for k, v in options.items() if v not in (None, {})}


def inversion_options(losses: list[dict[str, Any]], selection: dict[str, Any]) -> dict[str, Any]:
    """Recorded loss and selection specs as ``--loss``, ``--loss-option``, ``--selection`` and
    ``--selection-option`` (``smi invert`` and ``smi distill --synthesize`` alike)."""
    return {"loss": [f"{spec['name']}:{spec['weight']}" for spec in losses], "loss_option": named_option_texts(losses),
            "selection": selection["name"], "selection_option": named_option_texts([selection])}


def sink_flags(names: list[str], options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Recorded sinks and their options as ``--sink`` and ``--sink-option``."""
    return {"sink": list(names), "sink_option": named_option_texts([{"name": n, "options": o} for n, o in (options or {}).items()])}


def named_option_texts(specs: list[dict[str, Any]]) -> list[str]:
    """``NAME.KEY=VALUE`` strings for the options of recorded specs (``{"name", "options"}``:
    losses, selections, sinks, schemes)."""
    return [f"{s['name']}.{k}={v}" for s in specs for k, v in (s.get("options") or {}).items()]
