"""Names and settings of quantisation that the command line reads without importing torch:
the built-in calibrators, the default scheme, how sparse images are fed, and reconstruction's
configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from smi_engine.checks import at_least, number
from smi_engine.errors import SmiError

#: How an observer turns what it saw into a range. ``search`` is RepQ-ViT's: the clipping at the
#: 99.9, 99.99 or 99.999th percentile with the least squared quantisation error.
CALIBRATORS = ("minmax", "percentile", "mse", "search")
DEFAULT_SCHEME = "matmul"

#: How sparse pool images reach a model: the kept patches as tokens, or whole images with the
#: stopped patches at the normaliser's zero (the seed's way).
SPARSE_FEEDS = ("tokens", "blanked")
#: How they calibrate a quantised model: one of the feeds, or ``hybrid``: tokens, except that the
#: softmax probabilities take their ranges from whole images. An L-token sequence's attention
#: probabilities scale about as 1/L, so ranges seen on a pool's few kept tokens are several times
#: too wide for the whole images the model serves; every other activation is per token.
SPARSE_CALIBRATIONS = ("hybrid", *SPARSE_FEEDS)
DEFAULT_SPARSE_CALIB = "hybrid"
_SPARSE_MEANINGS = {"hybrid": "feeds the kept patches but takes the softmax ranges from whole images",
                    "tokens": "feeds the kept patches", "blanked": "feeds the whole image with stopped patches at zero"}
RECONSTRUCT_MODES = ("none", "block")


def check_sparse_calib(sparse: str, choices: tuple[str, ...] = SPARSE_CALIBRATIONS) -> None:
    if sparse not in choices:
        meanings = ", ".join(f"{choice} {_SPARSE_MEANINGS[choice]}" for choice in choices)
        raise SmiError(f"--sparse-calib {sparse!r} is not one of {', '.join(choices)}: {meanings}")


@dataclass(frozen=True)
class ReconstructConfig:
    """Block reconstruction (``smi_engine.downstream.reconstruct``); ``none`` keeps the
    calibrated ranges and rounds weights to nearest."""

    mode: str = "none"  # none | block
    iterations: int = 500  # per unit
    rounding_lr: float = 1e-2
    step_lr: float = 1e-3  # relative: the learned factor on each calibrated step size
    drop: float = 0.5
    p: float = 2.0

    def validate(self) -> None:
        if self.mode not in RECONSTRUCT_MODES:
            raise SmiError(f"--reconstruct {self.mode!r} is not one of {', '.join(RECONSTRUCT_MODES)}: "
                           "use block to learn each block's rounding and step sizes, none for ranges only")
        at_least("--recon-iters", self.iterations, 1, 500)
        number("--recon-lr", self.rounding_lr, 1e-2, low=0, exclusive="low", high=1)
        number("--recon-step-lr", self.step_lr, 1e-3, low=0, high=1)
        number("--recon-drop", self.drop, 0.5, low=0, high=1, exclusive="high")
        number("--recon-p", self.p, 2.0, low=1, high=4)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
