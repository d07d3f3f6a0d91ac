"""A rich progress bar fed by run events (the terminal view when no dashboard is open)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class InversionProgress:
    """Iterations over all batches of this process, with loss, kept patches and speed."""

    def __init__(self, console: Console, label: str = "inverting"):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.label = label
        self.task = None
        self.iterations = 1
        self.batches: list[int] = []
        self.rate = 0.0
        self.num_patches = 1

    def __enter__(self) -> "InversionProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind in ("run_start", "run_resumed") and event.get("kind") == "invert":
            self.iterations, self.batches = event["iterations"], event["pending_batches"]
            self.num_patches = event["num_patches"]
            self.task = self.progress.add_task(self.label, total=self.iterations * len(self.batches), info="")
        elif kind == "batch_start" and event["batch"] not in self.batches:  # batches made on demand (distill)
            self.iterations, self.batches = event["iterations"], self.batches + [event["batch"]]
            self.num_patches = event["num_patches"]
            if self.task is None:
                self.task = self.progress.add_task(self.label, total=0, info="")
            self.progress.update(self.task, total=self.iterations * len(self.batches))
        elif kind == "iteration" and self.task is not None:
            rate = 1.0 / max(event["seconds"], 1e-9)
            self.rate = rate if self.rate == 0 else 0.9 * self.rate + 0.1 * rate
            ordinal = self.batches.index(event["batch"]) if event["batch"] in self.batches else 0
            kept = event["kept"]
            info = (
                f"batch {ordinal + 1}/{len(self.batches)} · loss {event['losses']['total']:.3f} · "
                f"kept {kept}/{self.num_patches} ({100 * kept / self.num_patches:.0f}%) · {self.rate:.1f} it/s"
            )
            self.progress.update(self.task, completed=ordinal * self.iterations + event["iteration"] + 1, info=info)
