"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"), the dense loss SMI accelerates.

Terms (each weighted by its option; zero-weighted terms are skipped):
``ce``     cross-entropy of the teacher's logits against the targets (the seed: 1)
``tv_l2``  total variation, l2 norm over four neighbour directions (the seed for ViTs: 1e-4)
``tv_l1``  total variation, mean absolute difference (0)
``l2``     l2 norm of the image (0)
``bn``     BatchNorm-statistics prior through an auxiliary CNN (``bn_model``, a timm name;
           ViTs have no BatchNorm, so the seed borrows a ResNet-50): for every BatchNorm2d,
           ||running_var - batch var|| + ||running_mean - batch mean||, the first layer
           weighted ``bn_first_scale`` (10) (0)
``adv``    adversarial competition with a student: minus the Jensen-Shannon divergence of
           student and teacher at temperature ``adv_temperature`` (3), as the seed; the
           student is ``student`` (a model folder), or the one being trained in
           ``smi distill --synthesize`` (0)
The CNN and the student see the jittered image; a model that cannot drop tokens gets the
stopped patches blanked to the normaliser's zero, a ViT on the same grid gets sparse tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smi_engine import (
    Batch, InversionContext, LossState, ModelFeeder,
    ModelSpec, Normalizer, SmiError, hookimpl, load_model,
)


def bn_statistics_gap(module: nn.BatchNorm2d, inputs: torch.Tensor) -> torch.Tensor:
    """||running_var - var||_2 + ||running_mean - mean||_2 of a batch at a BatchNorm2d input."""
    channels = inputs.shape[1]
    mean = inputs.mean(dim=(0, 2, 3))
    var = inputs.permute(1, 0, 2, 3).reshape(channels, -1).var(dim=1, unbiased=False)
    return torch.linalg.vector_norm(module.running_var - var) + torch.linalg.vector_norm(module.running_mean - mean)


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The seed's (and DeepInversion's) Jensen-Shannon divergence, probabilities clamped to [0.01, 0.99]."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


class DeepInversionLoss:
    def __init__(self, ce: float = 1.0, tv_l2: float = 1e-4, tv_l1: float = 0.0, l2: float = 0.0, bn: float = 0.0,
                 bn_model: str = "resnet50", bn_checkpoint: str | None = None, bn_pretrained: bool = True,
                 bn_first_scale: float = 10.0, adv: float = 0.0, student: str | None = None,
                 adv_temperature: float = 3.0):
        # Options arrive converted to the annotated types (smi_engine.plugins.typed_options).
        self.weights = {"ce": ce, "tv_l2": tv_l2, "tv_l1": tv_l1, "l2": l2, "bn": bn, "adv": adv}
        self.bn_spec = ModelSpec(bn_model, pretrained=bn_pretrained, checkpoint=bn_checkpoint)
        self.bn_first_scale, self.adv_temperature = bn_first_scale, adv_temperature
        self.student_dir = student
        self.bn_feeder: ModelFeeder | None = None
        self.student_feeder: ModelFeeder | None = None

    def setup(self, context: InversionContext) -> None:
        if self.weights["bn"]:
            aux = load_model(self.bn_spec, context.device)
            self.bn_layers = [m for m in aux.model.modules() if isinstance(m, nn.BatchNorm2d)]
            if not self.bn_layers:
                raise SmiError(f"deepinversion.bn_model {self.bn_spec.name} has no BatchNorm2d layer: pick a CNN such as resnet50")
            self._bn_inputs: list[torch.Tensor] = []
            for layer in self.bn_layers:
                layer.register_forward_pre_hook(lambda _m, args: self._bn_inputs.append(args[0]))
            self.bn_feeder = ModelFeeder(aux.model, aux.normalizer)
        if self.weights["adv"] and self.student_dir:
            student = load_model(ModelSpec.from_dir(self.student_dir), context.device)
            self.use_student(student.model, student.normalizer)

    def use_student(self, model: nn.Module, normalizer: Normalizer) -> None:
        """Compete with this student (``smi distill --synthesize`` passes the one it trains)."""
        self.student_feeder = ModelFeeder(model, normalizer)

    def __call__(self, state: LossState) -> dict[str, torch.Tensor]:
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["ce"]:
            terms["ce"] = w["ce"] * F.cross_entropy(state.logits, state.targets)
        if w["tv_l2"] or w["tv_l1"]:
            differences = state.neighbour_differences()
            if w["tv_l2"]:
                terms["tv_l2"] = w["tv_l2"] * differences.l2()
            if w["tv_l1"]:
                terms["tv_l1"] = w["tv_l1"] * differences.l1()
        if w["l2"]:
            terms["l2"] = w["l2"] * torch.linalg.vector_norm(state.patches)
        if w["bn"] or w["adv"]:
            seen = Batch(state.augmented, state.grid.mask_from_indices(state.positions))
            if w["bn"]:
                self._bn_inputs.clear()
                self.bn_feeder(seen, state.normalizer)
                gaps = [bn_statistics_gap(m, x) for m, x in zip(self.bn_layers, self._bn_inputs)]
                terms["bn"] = w["bn"] * (self.bn_first_scale * gaps[0] + sum(gaps[1:]))
            if w["adv"]:
                if self.student_feeder is None:
                    raise SmiError("deepinversion.adv needs a student: --loss-option deepinversion.student=DIR, or smi distill --synthesize")
                terms["adv"] = -w["adv"] * js_divergence(self.student_feeder(seen, state.normalizer), state.logits, self.adv_temperature)
        return terms


@hookimpl
def register_losses(register):
    register("deepinversion", DeepInversionLoss)
