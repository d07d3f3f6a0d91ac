"""Quantisation schemes: which activations of a ViT are quantised, and how.

A scheme is registered through the ``register_quant_schemes`` hook (the built-ins ``matmul``,
``seed`` and ``repq`` too) as an object with ``description``, ``default_calibrator``,
``build(model, config)`` returning a fake-quantised copy ready to calibrate, optionally
``prepare(qmodel, config, feed)``, which may watch one float pass of the calibration images
(``feed()``) and change the float weights before the quantisers observe (an equivalent
transformation, such as ``repq``'s channel balancing), and ``finish(qmodel, config)`` fixing
its activation ranges (and whatever else it does, such as RepQ-ViT's fold) once the
calibration images have been fed. Weights are not rounded by the
scheme: the built model's ``QuantLinear`` layers hold float weights until the job rounds them,
to nearest or as block reconstruction learns. A built model answers ``forward(images)``; one
that handles sparse images itself also has ``forward_masked(images, keep)``; one that is not
laid out as timm's ViT names its reconstruction units (``reconstruction_units()``, see
``smi_engine.downstream.reconstruct``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import nn

from smi_engine.checks import number
from smi_engine.errors import SmiError
from smi_engine.plugins import build_plugin, typed_plugin_options
from smi_engine.quantization.layers import round_weights
from smi_engine.quantization.names import CALIBRATORS, DEFAULT_SCHEME
from smi_engine.quantization.quantizers import ActivationQuantizer, validate_bits


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 8
    a_bit: int = 8
    calibrator: str | None = None  # None: the scheme's own
    percentile: float = 99.99
    scheme: str = DEFAULT_SCHEME
    scheme_options: dict[str, Any] = field(default_factory=dict)  # the scheme factory's keyword arguments

    def validate(self) -> None:
        validate_bits(self.w_bit, self.a_bit)
        # The name is known and its options fit; the scheme itself is built once, by its job.
        typed_plugin_options("schemes", self.scheme, self.scheme_options)
        if self.calibrator is not None and self.calibrator not in CALIBRATORS:
            raise SmiError(f"unknown calibrator {self.calibrator!r}: use {', '.join(CALIBRATORS)}")
        number("--percentile", self.percentile, 99.99, low=50, high=100, exclusive="low")

    def resolved(self, scheme: "QuantScheme | None" = None) -> "QuantConfig":
        """The same with the scheme's calibrator filled in (``scheme``: the one already built)."""
        if self.calibrator is not None:
            return self
        # From the scheme built for the job, or its class: resolving builds no second scheme.
        factory = _registration(self.scheme).factory
        calibrator = getattr(scheme or factory, "default_calibrator", None) or self.build_scheme().default_calibrator
        return replace(self, calibrator=calibrator)

    def build_scheme(self) -> "QuantScheme":
        """A new scheme object of this configuration (its plugin's factory called once, with
        ``scheme_options``)."""
        return build_plugin("schemes", self.scheme, self.scheme_options)

    def activation(self, **kwargs: Any) -> ActivationQuantizer:
        """A per-tensor activation quantiser of this configuration."""
        return ActivationQuantizer(self.a_bit, self.calibrator or "minmax", self.percentile, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuantScheme(Protocol):
    description: str
    default_calibrator: str

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module: ...

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None: ...


def _registration(name: str):
    from smi_engine.plugins import get_registry  # the registry imports the built-in schemes

    return get_registry().get("schemes", name)


#: The attribute of a built model that holds the scheme object that built it.
SCHEME_ATTRIBUTE = "quant_scheme"


def quantize_model(model: nn.Module, config: QuantConfig, scheme: "QuantScheme | None" = None) -> nn.Module:
    """A fake-quantised copy of ``model`` (the original is untouched), ready to calibrate. The
    scheme (``scheme``, or one built here) is kept on the copy, so that ``finish`` is asked of
    the very object that built it (a scheme may keep state between the two)."""
    config.validate()
    scheme = scheme or config.build_scheme()
    qmodel = scheme.build(copy.deepcopy(model), config.resolved(scheme)).eval()
    setattr(qmodel, SCHEME_ATTRIBUTE, scheme)
    return qmodel


def prepare_calibration(qmodel: nn.Module, config: QuantConfig, feed: Callable[[], None]) -> None:
    """The scheme's ``prepare``, where it has one; ``feed()`` runs the calibration images
    through ``qmodel`` with every quantiser passing values through."""
    scheme = getattr(qmodel, SCHEME_ATTRIBUTE, None) or config.build_scheme()
    prepare = getattr(scheme, "prepare", None)
    if prepare is not None:
        prepare(qmodel, config.resolved(scheme), feed)


@torch.no_grad()
def fix_ranges(qmodel: nn.Module, config: QuantConfig) -> None:
    """Fix every activation range (and whatever else the scheme does after calibration); the
    weights stay float."""
    scheme = getattr(qmodel, SCHEME_ATTRIBUTE, None) or config.build_scheme()
    scheme.finish(qmodel, config.resolved(scheme))


@torch.no_grad()
def finish_calibration(qmodel: nn.Module, config: QuantConfig) -> None:
    """Fix every activation range and round every weight to nearest: the model is quantised."""
    fix_ranges(qmodel, config)
    round_weights(qmodel)


def quantizers(qmodel: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in qmodel.modules() if isinstance(m, ActivationQuantizer)]


def freeze_quantizers(qmodel: nn.Module) -> None:
    """Quantise with the stored ranges (a saved model being loaded back)."""
    for quantizer in quantizers(qmodel):
        quantizer.calibrating = False
