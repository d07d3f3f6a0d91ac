"""Teacher and student models: timm name + kwargs, pretrained weights, local checkpoints.

Checkpoints are read with ``weights_only=True`` or safetensors: loading never runs pickled code.
A model folder (written by ``smi teacher train``) holds ``model.safetensors`` and
``smi-model.json`` with everything needed to rebuild and normalise for the model.
"""

from __future__ import annotations

import difflib
import json
import math
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from smi_engine.checks import parse_pairs
from smi_engine.errors import SmiError
from smi_engine.files import read_regular
from smi_engine.files import atomic_path, unreadable_reason, write_json
from smi_engine.quantization.scheme import QuantConfig, freeze_quantizers, quantize_model

MODEL_CARD = "smi-model.json"
MODEL_WEIGHTS = "model.safetensors"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema")


@dataclass(frozen=True)
class Normalizer:
    """Per-channel normalisation of the model's input; pixels live in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _view(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._view(self.mean, pixels)) / self._view(self.std, pixels)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self._view(self.std, images) + self._view(self.mean, images)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised -> pixels in [0, 1] on the CPU: what previews and exports show."""
        return self.denormalize(images.detach().float().cpu()).clamp(0, 1)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of the valid pixel range [0, 1] in normalised space."""
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return (0.0 - mean) / std, (1.0 - mean) / std


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in config.json and model cards."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    quantization: dict[str, Any] | None = None  # set for a saved fake-quantised model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_weights(self) -> bool:
        return self.pretrained or self.checkpoint is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown or "name" not in data:
            problem = f"has an unknown field {unknown[0]!r}" if unknown else "has no 'name'"
            raise SmiError(f"model spec {problem}: its fields are {', '.join(cls.__dataclass_fields__)}")
        for key in ("mean", "std", "classes"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "ModelSpec":
        """The model saved in a folder by ``smi teacher train`` (or ``save_model``)."""
        folder = Path(folder)
        card = folder / MODEL_CARD
        if not card.is_file():
            raise SmiError(
                f"{folder} is not a model folder (no {MODEL_CARD}): "
                "pass a folder written by `smi teacher train`, or use --model/--checkpoint"
            )
        try:
            meta = json.loads(read_regular(card))
            return cls(
                name=meta["model"],
                args=meta.get("model_args", {}),
                checkpoint=str(folder / MODEL_WEIGHTS),
                mean=tuple(meta["mean"]),
                std=tuple(meta["std"]),
                classes=tuple(meta["classes"]) if meta.get("classes") else None,
                quantization=meta.get("quantization"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SmiError(f"{card} is malformed ({exc}): re-create it with `smi teacher train`") from None


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec  # resolved: mean and std always set
    normalizer: Normalizer

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return model_input_size(self.model)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for. timm's data config repeats the pretrained config
    (3x224x224) even when the model was created with other ``img_size``/``in_chans``."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        conv = next(m for m in embed.modules() if isinstance(m, nn.Conv2d))
        return (int(conv.in_channels), *map(int, embed.img_size))
    size = tuple(timm.data.resolve_model_data_config(model)["input_size"])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first_conv.in_channels if first_conv is not None else size[0], *size[1:])


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args img_size=32,patch_size=4`` -> the keyword arguments of timm's factory."""
    return parse_pairs(text, "--model-args", "img_size=32,patch_size=4")


def parse_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SmiError(f"bad number list {text!r}: write comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state_dict (.safetensors, or .pth/.pt/.bin with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise SmiError(f"checkpoint {path} does not exist: check the path")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means an unusable file
        raise SmiError(
            f"cannot read checkpoint {path} ({unreadable_reason(exc)}): pass a plain state_dict saved with "
            "torch.save(model.state_dict()) or safetensors"
        ) from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in _WRAPPER_KEYS:
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SmiError(f"checkpoint {path} holds no state_dict of tensors: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str, spec: ModelSpec) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state)
        return
    if mismatched:
        k = mismatched[0]
        detail = f"{k} is {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
    elif missing:
        detail = f"{len(missing)} weights missing (e.g. {missing[0]})"
    else:
        detail = f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})"
    raise SmiError(
        f"checkpoint {path} does not fit {spec.name}({_format_args(spec.args)}): {detail}; "
        "pass the --model and --model-args it was trained with"
    )


def _format_args(args: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the timm model of a spec (weights from the hub or a checkpoint), in eval mode."""
    if not timm.is_model(spec.name):
        close = difflib.get_close_matches(spec.name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models('*vit*')`"
        raise SmiError(f"unknown model {spec.name!r}: {hint}")
    check_model_args(spec.args)
    if spec.pretrained and not spec.checkpoint:
        check_weights_reachable(spec.name)
    try:
        # Models without trained weights (speed runs, tests) start from the same random weights
        # every time, so a run can be resumed or repeated; the caller's RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(spec.name, pretrained=spec.pretrained and not spec.checkpoint, **spec.args)
    except TypeError as exc:
        raise SmiError(f"bad --model-args for {spec.name} ({exc}): use keyword arguments of timm's model") from None
    except (OSError, RuntimeError, ValueError, AssertionError, ZeroDivisionError) as exc:
        if spec.pretrained and not isinstance(exc, (AssertionError, ZeroDivisionError)):
            raise SmiError(
                f"could not fetch pretrained weights for {spec.name} ({str(exc).splitlines()[0][:120]}): "
                "check the network, or pass --checkpoint FILE"
            ) from None
        raise SmiError(f"cannot build {spec.name}({_format_args(spec.args)}): {exc}") from None
    if getattr(model, "num_classes", 1) < 1:
        raise SmiError(f"{spec.name} has no classes (num_classes={model.num_classes}): inversion needs a classifier; "
                       "pass --model-args num_classes=N")
    if spec.quantization is not None:  # rebuild the quantised structure its weights belong to
        model = quantize_model(model, _saved_quantization(spec))
        freeze_quantizers(model)
    if spec.checkpoint:
        _fit_state_dict(model, read_state_dict(spec.checkpoint), spec.checkpoint, spec)
    return model.eval()


def _saved_quantization(spec: ModelSpec) -> QuantConfig:
    """The quantisation a saved model's card records, its scheme installed here."""
    from smi_engine.plugins import get_registry

    try:
        config = QuantConfig(**spec.quantization)
    except TypeError as exc:
        raise SmiError(f"the model card's quantization record is malformed ({exc}): save the model again with "
                       "`smi quantize --out`") from None
    installed = get_registry().entries["schemes"]
    if not isinstance(config.scheme, str) or config.scheme not in installed:
        raise SmiError(f"this model was quantised by scheme {str(config.scheme)[:64]!r}, which no installed plugin "
                       f"registers (installed: {', '.join(sorted(installed))}): install the plugin that provides it "
                       "(`smi plugins` lists them)")
    return config


def check_weights_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when timm's pretrained weights for ``name`` are neither in the
    local cache nor downloadable: offline, the hub client retries for most of a minute first."""
    from urllib.parse import urlparse

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return  # timm names the problem
    if cfg is None:
        return
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return
        where = urlparse(constants.ENDPOINT)
    elif cfg.url:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return
        where = urlparse(cfg.url)
    else:
        return
    port = where.port or (443 if where.scheme == "https" else 80)
    try:
        socket.create_connection((where.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise SmiError(f"--pretrained needs timm's weights for {name}, which are not in the local cache, and "
                       f"{where.hostname}:{port} cannot be reached ({exc.strerror or exc}): connect to the network "
                       "once to fetch them, or pass --checkpoint FILE") from None


#: timm ViT arguments that count something: each must be a whole number of at least 1.
COUNT_ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "depth", "num_heads", "embed_dim")


def check_model_args(args: dict[str, Any]) -> None:
    """Refuse, before timm builds anything, ViT arguments that cannot make a model (timm would
    fail with an assertion, a division by zero, or build one with no patches)."""
    counts = {k: args[k] for k in COUNT_ARGS if k in args}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SmiError(f"--model-args {key}={value!r} is not a whole number of at least 1: e.g. {key}="
                           f"{ {'img_size': 32, 'patch_size': 4, 'in_chans': 3, 'num_classes': 10, 'depth': 12, 'num_heads': 3, 'embed_dim': 192}[key]}")
    if isinstance(counts.get("img_size"), int) and counts.get("patch_size", 0) > counts["img_size"]:
        raise SmiError(f"--model-args patch_size={counts['patch_size']} is larger than img_size={counts['img_size']}: "
                       "the image would hold no patch; use a smaller patch_size")
    if "embed_dim" in counts and "num_heads" in counts and counts["embed_dim"] % counts["num_heads"]:
        raise SmiError(f"--model-args embed_dim={counts['embed_dim']} does not split into num_heads={counts['num_heads']} "
                       "heads: choose num_heads dividing embed_dim")


def resolve_normalizer(model: nn.Module, spec: ModelSpec) -> Normalizer:
    """The spec's mean/std, else timm's data config for the model (averaged for grey models)."""
    config = timm.data.resolve_model_data_config(model)
    in_chans = model_input_size(model)[0]
    mean = spec.mean or tuple(float(v) for v in config["mean"])
    std = spec.std or tuple(float(v) for v in config["std"])
    if spec.mean is None and len(mean) != in_chans:
        mean = (sum(mean) / len(mean),) * in_chans
    if spec.std is None and len(std) != in_chans:
        std = (sum(std) / len(std),) * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise SmiError(
            f"--mean/--std have {len(mean)}/{len(std)} values but the model takes {in_chans} channels: "
            "give one value per channel"
        )
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise SmiError(f"--mean/--std must be finite numbers, got {mean}/{std}: e.g. --mean 0.5 --std 0.25")
    if any(s <= 0 for s in std):
        raise SmiError("--std values must be positive")
    return Normalizer(mean, std)


def load_model(spec: ModelSpec, device: torch.device | str = "cpu", frozen: bool = True) -> LoadedModel:
    model = create_model(spec)
    normalizer = resolve_normalizer(model, spec)
    if frozen:
        model.requires_grad_(False)
    resolved = replace(spec, mean=normalizer.mean, std=normalizer.std)
    return LoadedModel(model.to(device), resolved, normalizer)


def read_card(folder: str | Path) -> dict[str, Any]:
    """The metadata of a model folder (``smi-model.json``)."""
    try:
        return json.loads(read_regular(Path(folder) / MODEL_CARD))
    except (OSError, ValueError) as exc:
        raise SmiError(f"cannot read {Path(folder) / MODEL_CARD} ({exc}): pass a folder from `smi teacher train`") from None


def save_model(folder: str | Path, loaded: LoadedModel, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` + ``smi-model.json`` atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    card = {
        "model": loaded.spec.name,
        "model_args": loaded.spec.args,
        "num_classes": loaded.num_classes,
        "classes": list(loaded.spec.classes) if loaded.spec.classes else None,
        "mean": list(loaded.normalizer.mean),
        "std": list(loaded.normalizer.std),
        "input_size": list(loaded.input_size),
        "quantization": loaded.spec.quantization,
        **(extra or {}),
    }
    write_json(folder / MODEL_CARD, card)
