"""Progress on stderr while a command works: a rich bar in a terminal, and plain lines at a
steady interval when stderr is a file or a pipe (nohup, tmux logs, SLURM, CI), where a bar
would write nothing useful until the end.

Displays take tasks with a true total; adapters turn run events (inversion iterations,
training steps, ``progress`` events of evaluation and calibration) into their updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from smi_engine.checks import positive
from smi_engine.inversion.schedule import CostModel

DEFAULT_EVERY = 10.0  # seconds between plain progress lines


def duration(seconds: float | None) -> str:
    """H:MM:SS, or '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Task:
    label: str
    total: int
    started: float
    completed: int = 0
    info: str = ""
    eta: float | None = None  # the caller's projection; otherwise from the average speed so far

    def remaining(self, now: float) -> float | None:
        if self.eta is not None:
            return self.eta
        if self.completed >= self.total:
            return 0.0
        if self.completed <= 0 or now - self.started < 1.0:  # too early for a speed to mean anything
            return None
        return (now - self.started) / self.completed * max(self.total - self.completed, 0)


class Display(Protocol):
    def add(self, label: str, total: int) -> Task: ...
    def update(self, task: Task, completed: int, info: str = "", eta: float | None = None) -> None: ...
    def log(self, message: str) -> None: ...
    def __enter__(self) -> "Display": ...
    def __exit__(self, *exc: Any) -> None: ...


class NoDisplay:
    """--quiet: nothing."""

    def add(self, label: str, total: int) -> Task:
        return Task(label, total, time.monotonic())

    def update(self, task: Task, completed: int, info: str = "", eta: float | None = None) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def __enter__(self) -> "NoDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class LogDisplay(NoDisplay):
    """One plain line per task every ``every`` seconds (and when it starts and completes):
    no escape codes, nothing cut, each line whole."""

    def __init__(self, write: Callable[[str], None], every: float = DEFAULT_EVERY, clock: Callable[[], float] = time.monotonic):
        self.write, self.every, self.clock = write, every, clock
        self.printed: dict[int, float] = {}

    def add(self, label: str, total: int) -> Task:
        return Task(label, total, self.clock())

    def update(self, task: Task, completed: int, info: str = "", eta: float | None = None) -> None:
        task.completed, task.info, task.eta = completed, info, eta
        now = self.clock()
        last = self.printed.get(id(task))
        if last is None or now - last >= self.every or completed >= task.total:
            self.printed[id(task)] = now
            self.write(self.line(task, now))

    def line(self, task: Task, now: float) -> str:
        percent = 100 * task.completed / max(task.total, 1)
        parts = [f"{task.label} {task.completed}/{task.total} ({percent:.0f}%)", task.info,
                 f"elapsed {duration(now - task.started)}", f"ETA {duration(task.remaining(now))}"]
        return " · ".join(p for p in parts if p)

    def log(self, message: str) -> None:
        self.write(message)


class TerminalDisplay(NoDisplay):
    """A rich bar per task. Count, elapsed time and ETA come before the details, which are the
    ones cut short in a narrow terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[info]}", markup=False,  # loss names are plugins' words, not markup
                       table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=console, transient=False, expand=True,
        )
        self.ids: dict[int, Any] = {}

    def add(self, label: str, total: int) -> Task:
        task = Task(label, total, time.monotonic())
        self.ids[id(task)] = self.progress.add_task(label, total=total, info="", eta="-")
        return task

    def update(self, task: Task, completed: int, info: str = "", eta: float | None = None) -> None:
        task.completed, task.info, task.eta = completed, info, eta
        self.progress.update(self.ids[id(task)], completed=completed, info=info,
                             eta=duration(task.remaining(time.monotonic())))

    def log(self, message: str) -> None:
        self.progress.console.print(message, soft_wrap=True, markup=False, highlight=False)

    def __enter__(self) -> "TerminalDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


def open_display(console: Console, quiet: bool = False, every: float = DEFAULT_EVERY) -> Display:
    """The display for this stderr: nothing (quiet), a bar (a terminal) or plain lines."""
    positive("--progress-every", every, DEFAULT_EVERY)
    if quiet:
        return NoDisplay()
    if console.is_terminal:
        return TerminalDisplay(console)
    return LogDisplay(lambda line: console.file.write(line + "\n") or console.file.flush(), every)


# -- adapters: run events -> display updates ------------------------------------------------------
class InversionProgress:
    """Inversion iterations over every batch this process inverts (``smi invert``, ``smi demo``,
    and the batches ``smi distill --synthesize`` makes: its run_start announces how many).
    The ETA projects the average speed so far over the schedule's remaining cost."""

    def __init__(self, display: Display, label: str = "invert"):
        self.display, self.label = display, label
        self.task: Task | None = None
        self.iterations, self.batches, self.num_patches = 1, 0, 1
        self.done_batches, self.open_batch, self.total_batches = -1, None, 0
        self.images_made, self.total_images = 0, 0  # images written to the pool (several per trajectory under pri)
        self.shown: tuple[dict[str, Any], float | None] | None = None  # the latest iteration shown, and its ETA
        self.model: CostModel | None = None
        self.seconds = self.cost_done = 0.0
        self.rate = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind in ("run_start", "run_resumed") and event.get("kind") == "invert":
            self._start(event["iterations"], len(event["pending_batches"]), event["batches"])
            self.num_patches = event["num_patches"]
            self.total_images = event["batches"] * event["batch_size"] * event.get("images_per_trajectory", 1)
            self.model = CostModel.of([s[0] for s in event["stops"]], event["kept_per_stage"], event["prefix_tokens"],
                                      event["width"], event["iterations"])
        elif kind == "run_start" and event.get("synthesis"):
            synthesis = event["synthesis"]
            self._start(synthesis["iterations"], synthesis["batches"], synthesis["batches"])
        elif kind == "batch_end":
            self.images_made += event.get("images", 0)
            if self.shown is not None:
                self._show(*self.shown)
        elif kind in ("batch_start", "batch_resumed"):
            self.done_batches += 1
            if kind == "batch_start" and (self.model is None or self.model.iterations != event["iterations"]):
                self.num_patches = event["num_patches"]
                self.model = CostModel.of(event["stop_iterations"], event["kept_per_stage"], event["prefix_tokens"],
                                          event["width"], event["iterations"])
        elif kind == "iteration" and self.task is not None:
            self._iteration(event)

    def _start(self, iterations: int, batches: int, total_batches: int) -> None:
        self.iterations, self.batches, self.total_batches = iterations, batches, total_batches
        self.task = self.display.add(self.label, iterations * batches)

    def _iteration(self, event: dict[str, Any]) -> None:
        done_in_batch = event["iteration"] + 1
        self.seconds += event["seconds"]
        rate = 1.0 / max(event["seconds"], 1e-9)
        self.rate = rate if self.rate == 0 else 0.9 * self.rate + 0.1 * rate
        eta = None
        if self.model is not None:  # this process's own batches: after a resume, only what is left
            self.cost_done += self.model.cost(event["iteration"], done_in_batch)
            eta = self.model.eta(self.seconds, self.cost_done, [done_in_batch], self.batches - self.done_batches - 1)
        self.shown = (event, eta)
        if done_in_batch < self.iterations:  # a batch's last iteration is shown by its batch_end, with its images
            self._show(event, eta)

    def _show(self, event: dict[str, Any], eta: float | None) -> None:
        kept, losses = event["kept"], event["losses"]
        images = f" · images {self.images_made}/{self.total_images}" if self.total_images else ""
        info = (f"batch {event['batch'] + 1}/{self.total_batches}{images} · kept {kept}/{self.num_patches} "
                f"({100 * kept / self.num_patches:.0f}%) · loss {losses['total']:.4g}{_terms(losses)} · {self.rate:.1f} it/s")
        completed = max(self.done_batches, 0) * self.iterations + event["iteration"] + 1
        self.display.update(self.task, min(completed, self.task.total), info, eta)


def _terms(losses: dict[str, float], most: int = 3) -> str:
    terms = [(k.rpartition(".")[2], v) for k, v in losses.items() if k != "total"][:most]
    return " (" + ", ".join(f"{k} {v:.3g}" for k, v in terms) + ")" if len(terms) > 1 else ""


class TrainingProgress:
    """Training steps over all epochs (teacher training, distillation), a line per validation."""

    def __init__(self, display: Display, label: str, unit: str = "epoch"):
        self.display, self.label, self.unit = display, label, unit
        self.task: Task | None = None
        self.validation: Task | None = None
        self.total = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "run_start" and event.get("total_steps"):
            self.total = event["total_steps"]
        elif kind == "progress" and event["phase"] == "validate":  # one bar, again each validation
            if self.validation is None:
                self.validation = self.display.add("validate", event["total"])
            elif event["done"] < self.validation.completed:  # the next validation: its own elapsed time and ETA
                self.validation.started = time.monotonic()
            self.validation.total = event["total"]
            self.display.update(self.validation, event["done"])
        elif kind == "train_step":
            if self.task is None:
                self.task = self.display.add(self.label, self.total or event["steps"] * event["epochs"])
            info = f"{self.unit} {event['epoch'] + 1}/{event['epochs']} · loss {event['loss']:.4g}"
            self.display.update(self.task, event["done_steps"], info)
        elif kind == "epoch_end":
            best = f" (best {event['best_top1']:.2f}%)" if "best_top1" in event else ""
            loss = event.get("train_loss", event.get("kt_loss", float("nan")))
            self.display.log(f"{self.unit} {event['epoch'] + 1}/{event['epochs']}: loss {loss:.4f} · "
                             f"val top-1 {event['val_top1']:.2f}%{best} · top-5 {event['val_top5']:.2f}%")


class PhaseProgress:
    """``progress`` events (and direct calls) of jobs that go through phases of known size:
    calibration, evaluation."""

    def __init__(self, display: Display):
        self.display = display
        self.tasks: dict[str, Task] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            self.advance(event["phase"], event["done"], event["total"])

    def advance(self, phase: str, done: int, total: int) -> None:
        task = self.tasks.get(phase)
        if task is None:
            task = self.tasks[phase] = self.display.add(phase, total)
        self.display.update(task, done)
