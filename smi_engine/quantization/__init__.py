"""Post-training quantisation of timm ViTs: quantisers, schemes (``matmul``, ``seed``, ``repq``
and any a plugin registers), and the calibrate-then-evaluate job. ``quantizers(model)`` lives in
``smi_engine.quantization.scheme`` (the name ``quantizers`` here is the submodule)."""

from smi_engine.lazy import lazy_exports
from smi_engine.quantization.names import CALIBRATORS, DEFAULT_SCHEME

_QUANTIZERS, _SCHEME = "smi_engine.quantization.quantizers", "smi_engine.quantization.scheme"
_EXPORTS = {
    "ActivationQuantizer": _QUANTIZERS, "LogQuantizer": _QUANTIZERS, "QuantConfig": _SCHEME,
    "finish_calibration": _SCHEME, "freeze_quantizers": _SCHEME, "get_scheme": _SCHEME,
    "quantize_model": _SCHEME,
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["CALIBRATORS", "DEFAULT_SCHEME", *_EXPORTS]
