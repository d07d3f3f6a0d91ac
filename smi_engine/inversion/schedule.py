"""Stopping schedules: when to stop inverting how many patches, and what that saves.

A schedule is a list of stops ``(iteration, ratio)``: at ``iteration`` the patches still being
inverted are scored and ``ratio`` of them (rounded so that ``floor(n * (1 - ratio))`` remain) are
stopped for good. ``dense`` is the empty schedule.

``every:V`` is Patch Rebirth's uniform detachment: V - 1 stops at ``k * (T // V)`` (k = 1..V-1)
that each take an equal share of the *original* N patches, so a trajectory splits into V parts.
Where V does not divide N the shares are cumulative floors: after stop k, ``N - floor(k * N / V)``
patches remain, so every share is ``floor(N / V)`` or one more and the last part is never smaller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from smi_engine.errors import SmiError

# The seed's schedule for 4000 iterations (Egg-Hu/SMI README: --prune_it 50 100 200 300
# --prune_ratio 0.3 0.3 0.3 0.3).
SEED_SCHEDULE_TEXT = "50:0.3,100:0.3,200:0.3,300:0.3"
SEED_ITERATIONS = 4000


@dataclass(frozen=True)
class Stop:
    iteration: int
    ratio: float


EVERY_PREFIX = "every:"


@dataclass(frozen=True)
class Schedule:
    stops: tuple[Stop, ...] = ()
    every: int = 0  # V of ``every:V`` (0: the stops are explicit); its stops come from ``resolved``

    @property
    def is_dense(self) -> bool:
        return not self.stops and not self.every

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """Parse ``dense``, ``every:V`` or ``it:ratio,it:ratio,...``; validation against the run
        is separate. An ``every:V`` schedule gets its stops from ``resolved(iterations)``."""
        text = text.strip()
        if text.lower() == "dense" or text == "":
            return cls()
        if text.lower().startswith(EVERY_PREFIX):
            parts = text[len(EVERY_PREFIX):].strip()
            if not parts.isdigit() or int(parts) < 2:
                raise SmiError(f"bad schedule {text!r}: every:V splits each trajectory into V >= 2 images, "
                               "e.g. --schedule every:4")
            return cls(every=int(parts))
        stops = []
        for item in text.split(","):
            iteration, sep, ratio = item.strip().partition(":")
            try:
                if not sep:
                    raise ValueError
                stops.append(Stop(int(iteration), float(ratio)))
            except ValueError:
                raise SmiError(
                    f"bad schedule item {item.strip()!r}: write stops as ITERATION:RATIO, "
                    f"e.g. --schedule {SEED_SCHEDULE_TEXT}, or --schedule dense"
                ) from None
        return cls(tuple(stops))

    def __str__(self) -> str:
        if self.is_dense:
            return "dense"
        if self.every:
            return f"{EVERY_PREFIX}{self.every}"
        return ",".join(f"{s.iteration}:{s.ratio:g}" for s in self.stops)

    def resolved(self, iterations: int) -> "Schedule":
        """The schedule with its stops for a run of ``iterations`` (explicit stops stay as they are).
        An ``every:V`` stop's ratio is its nominal share of the remaining patches, 1 / (V - k + 1);
        the exact counts are ``kept_patches``'s."""
        if not self.every:
            return self
        step = iterations // self.every
        stops = tuple(Stop(k * step, 1.0 / (self.every - k + 1)) for k in range(1, self.every))
        return Schedule(stops, self.every)

    def validate(self, iterations: int, num_patches: int) -> None:
        """Raise SmiError unless every stop is well-formed for a run of this length and grid."""
        if self.every:
            if iterations < self.every:
                raise SmiError(f"schedule {self} needs at least {self.every} iterations to detach {self.every} "
                               f"parts, got --iterations {iterations}: raise --iterations or lower V")
            if num_patches < self.every:
                raise SmiError(f"schedule {self} splits {num_patches} patches into {self.every} images: "
                               f"use V <= {num_patches}")
            return  # its stops are derived, in order and inside the run by construction
        previous = 0
        for stop in self.stops:
            if not 0.0 < stop.ratio < 1.0:
                raise SmiError(
                    f"schedule ratio {stop.ratio:g} at iteration {stop.iteration} is outside (0, 1): "
                    "a ratio is the fraction of the remaining patches to stop, e.g. 0.3"
                )
            if stop.iteration <= previous:
                raise SmiError(
                    f"schedule iterations must increase and start at 1 or later, got {stop.iteration} "
                    f"after {previous}: list the stops in order, e.g. {SEED_SCHEDULE_TEXT}"
                )
            if stop.iteration >= iterations:
                raise SmiError(
                    f"schedule stop at iteration {stop.iteration} is past --iterations {iterations}: "
                    "raise --iterations or move the stop earlier"
                )
            previous = stop.iteration
        remaining = self.kept_patches(num_patches)[-1]
        if remaining < 1:
            raise SmiError(
                f"schedule {self} stops every one of the {num_patches} patches: "
                "use fewer stops or smaller ratios"
            )

    def kept_patches(self, num_patches: int) -> list[int]:
        """Patches still inverted in each stage: before the first stop, after each stop."""
        if self.every:
            return [num_patches - k * num_patches // self.every for k in range(self.every)]
        counts = [num_patches]
        for stop in self.stops:
            counts.append(math.floor(counts[-1] * (1.0 - stop.ratio)))
        return counts

    def scaled(self, iterations: int, reference_iterations: int = SEED_ITERATIONS) -> "Schedule":
        """The same stops moved proportionally to a run of ``iterations`` (at least 1 apart);
        ``every:V`` is proportional already."""
        if self.every:
            return Schedule(every=self.every)
        stops, previous = [], 0
        for stop in self.stops:
            at = max(previous + 1, round(stop.iteration * iterations / reference_iterations))
            stops.append(Stop(at, stop.ratio))
            previous = at
        return Schedule(tuple(stops))


def block_flops(tokens: int, width: int) -> float:
    """Forward FLOPs of one transformer block: QKV/proj/MLP matmuls plus the two attention matmuls."""
    return 24.0 * tokens * width**2 + 4.0 * tokens**2 * width


def speedup_bound(
    schedule: Schedule, iterations: int, num_patches: int, prefix_tokens: int, width: int
) -> float:
    """Dense cost / scheduled cost over the whole run: the most stopping can save.

    Only the transformer blocks count; work that does not shrink with the token count (the
    optimiser on the pixels, the image prior) is what keeps a real run below this bound.
    """
    dense = iterations * block_flops(num_patches + prefix_tokens, width)
    schedule = schedule.resolved(iterations)
    sparse = CostModel.of([s.iteration for s in schedule.stops], schedule.kept_patches(num_patches), prefix_tokens,
                          width, iterations).batch_cost
    return dense / sparse


@dataclass(frozen=True)
class CostModel:
    """Token FLOPs of the iterations of one batch under a schedule: the unit in which ETAs are
    projected (a sparse run's later iterations are cheaper than its first ones)."""

    starts: tuple[int, ...]  # first iteration of each stage
    costs: tuple[float, ...]  # block FLOPs of one iteration in each stage
    iterations: int

    @classmethod
    def of(cls, stop_iterations: list[int], kept_per_stage: list[int], prefix_tokens: int, width: int,
           iterations: int) -> "CostModel":
        return cls((0, *stop_iterations), tuple(block_flops(k + prefix_tokens, width) for k in kept_per_stage),
                   iterations)

    def cost(self, start: int, end: int) -> float:
        """Cost of iterations ``start`` (inclusive) to ``end`` (exclusive) of a batch."""
        bounds = (*self.starts[1:], self.iterations)
        return sum(c * max(0, min(end, b) - max(start, a)) for a, b, c in zip(self.starts, bounds, self.costs))

    @property
    def batch_cost(self) -> float:
        return self.cost(0, self.iterations)

    def eta(self, seconds: float, cost_done: float, open_batches: Iterable[int], unstarted: int,
            workers: int = 1) -> float | None:
        """Seconds left at the speed so far (``seconds`` for ``cost_done``): the rest of each open
        batch (its iterations done given) and ``unstarted`` whole batches, shared by ``workers``.
        The one projection: the dashboard's view of a whole run and a process's own progress line
        differ only in the work they pass."""
        if cost_done <= 0 or seconds <= 0:
            return None
        remaining = sum(self.cost(done, self.iterations) for done in open_batches) + max(unstarted, 0) * self.batch_cost
        return seconds / cost_done * remaining / max(workers, 1)
