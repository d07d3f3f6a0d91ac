"""Fake quantisation of timm ViTs, as a model transformation: quantisers, the layers schemes
build from, and the schemes (``matmul``, ``seed``, ``repq`` and any a plugin registers). It
knows nothing of runs, data or pools, so ``models`` can rebuild a saved quantised model from it;
the job that calibrates, reconstructs and evaluates is ``smi_engine.downstream.quantize``.
``quantizers(model)`` lives in ``smi_engine.quantization.scheme`` (the name ``quantizers`` here
is the submodule)."""

from smi_engine.lazy import lazy_exports
from smi_engine.quantization.names import CALIBRATORS, DEFAULT_SCHEME

_QUANTIZERS, _SCHEME = "smi_engine.quantization.quantizers", "smi_engine.quantization.scheme"
_EXPORTS = {
    "ActivationQuantizer": _QUANTIZERS, "AdaptiveLogQuantizer": _QUANTIZERS, "LogQuantizer": _QUANTIZERS,
    "QuantConfig": _SCHEME,
    "finish_calibration": _SCHEME, "freeze_quantizers": _SCHEME,
    "quantize_model": _SCHEME,
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["CALIBRATORS", "DEFAULT_SCHEME", *_EXPORTS]
