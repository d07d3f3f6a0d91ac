"""Top-1 / top-5 accuracy of a classifier on real data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from smi_engine.runs.events import EventBus


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    limit: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Accuracy (in %) of ``forward`` over (images, labels) batches, at most ``limit`` images;
    ``on_batch(images seen, images in all)`` after each batch, for progress displays."""
    total = len(getattr(batches, "dataset", ()))
    total = min(total, limit) if limit is not None and total else (total or limit or 0)
    seen = correct1 = correct5 = 0
    for images, labels in batches:
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
        logits = forward(images.to(device))
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        seen += labels.shape[0]
        if on_batch is not None:
            on_batch(seen, max(total, seen))
    if seen == 0:
        return {"top1": 0.0, "top5": 0.0, "images": 0}
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "images": seen}


def validation_progress(bus: "EventBus") -> Callable[[int, int], None]:
    """``on_batch`` for a validation inside training: ``progress`` events of phase ``validate``,
    so that a long validation is not silence on a progress display."""
    return lambda done, total: bus.emit("progress", phase="validate", done=done, total=total)
