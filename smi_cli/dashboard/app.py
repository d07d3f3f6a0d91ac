"""The dashboard app: one view per run directory, fed by followers of their events.jsonl.

Events are folded into each view's RunState as they arrive; panels repaint at most ten times
a second, so a run emitting thousands of events per second costs a handful of frames.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from smi_cli.console import plain
from smi_cli.dashboard.follower import EventFollower
from smi_cli.dashboard.messages import EngineFinished, EventsArrived
from smi_engine.runs.state import RunState
from smi_cli.dashboard.widgets import (
    LossChart, Panel, PatchRetention, Preview, Problem, RunHeader, Throughput, Training, loss_series,
)
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.files import write_bytes
from smi_engine.runs.liveness import Liveness
from smi_engine.runs.rundir import RunDir

FRAME_SECONDS = 0.1
LIVENESS_SECONDS = 1.0  # how often a run is checked for being dead or stalled
KEYS = (
    ("q", "quit (a watched run goes on; a run in this process asks first)"),
    ("p", "pause / resume a run in this process"),
    ("s", "save a screenshot (SVG) into the run directory"),
    ("x", "ask the run to stop cleanly (it saves a checkpoint for --resume)"),
    ("?", "show these keys"),
)


class RunView(Vertical):
    """Every panel of one run: inversion panels, or training panels for distill and teacher runs."""

    def __init__(self, run_dir: Path, kind: str, index: int):
        super().__init__(classes="run")
        self.run_dir, self.kind, self.index = run_dir, kind, index
        self.state = RunState(kind=kind)
        self.liveness = Liveness("running")
        self.dirty = True

    def compose(self) -> ComposeResult:
        yield RunHeader(classes="header")
        yield Problem(classes="problem")
        with Grid(classes="panels"):
            if self.kind == "invert":
                yield PatchRetention(classes="main")
            yield LossChart()
            yield Throughput()
            if self.kind != "invert":
                yield Training(classes="main wide" if self.kind == "teacher" else "main")
            if self.kind != "teacher":  # a teacher's training makes no images
                yield Preview()

    def apply(self, events: list[dict]) -> None:
        for event in events:
            self.state.apply(event)
        self.dirty = True

    def check_liveness(self, now: float) -> None:
        liveness = self.state.liveness(self.run_dir, now)
        if liveness != self.liveness:
            self.liveness, self.dirty = liveness, True

    def repaint(self, scale: dict[str, tuple[float, float]]) -> None:
        self.query_one(Problem).display = bool(self.state.error or self.state.interrupted or self.liveness.status == "dead")
        self.query_one(LossChart).scale = scale
        for panel in self.query(Panel):
            panel.liveness = self.liveness
            panel.show(self.state, self.run_dir)
        self.dirty = False


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(Text(f"{self.question}\n\n[y] yes    [n] no"), classes="dialog")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class Keys(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]

    def compose(self) -> ComposeResult:
        text = Text("Keys\n\n", "bold")
        for key, meaning in KEYS:
            text.append(f"  {key}  ", "bold cyan")
            text.append(meaning + "\n")
        yield Static(text, classes="dialog")

    def action_close(self) -> None:
        self.dismiss(None)


class Dashboard(App):
    CSS_PATH = Path(__file__).with_name("dashboard.tcss")  # absolute: subclasses live elsewhere
    TITLE = "smi"
    BINDINGS = [
        Binding("q", "quit_dashboard", "Quit"),
        Binding("p", "pause", "Pause"),
        Binding("s", "screenshot", "Screenshot"),
        Binding("x", "stop_run", "Stop run"),
        Binding("question_mark", "keys", "Keys"),
    ]

    def __init__(self, run_dirs: list[Path], kinds: list[str], control: RunControl | None = None,
                 job: Callable[[], None] | None = None, follow: bool = True, clock: Callable[[], float] | None = None):
        super().__init__()
        # A finished recording is judged at its last event; a followed run against the wall clock.
        self.clock = clock or (time.time if follow else None)
        self.run_dirs, self.kinds = run_dirs, kinds
        self.control, self.job = control, job  # an in-process run, when started by `smi invert --tui`
        self.follow = follow
        self.followers: list[EventFollower] = []
        self.job_running = job is not None
        self.job_thread: threading.Thread | None = None
        self.job_error: str | None = None
        self.job_interrupted = False

    def compose(self) -> ComposeResult:
        if len(self.run_dirs) > 1:
            yield Static(classes="compare", id="compare")
        with Horizontal(id="runs"):
            for index, (run_dir, kind) in enumerate(zip(self.run_dirs, self.kinds)):
                yield RunView(run_dir, kind, index)
        yield Footer()

    def on_mount(self) -> None:
        for index, run_dir in enumerate(self.run_dirs):
            follower = EventFollower(RunDir(run_dir).events, lambda events, i=index: self.post_message(EventsArrived(i, events)))
            self.followers.append(follower)
            if self.follow:
                follower.start()
            else:  # a finished recording: read it all now, a chunk at a time
                while events := follower.read_new():
                    self.on_events_arrived(EventsArrived(index, events))
        if self.job is not None:
            self.job_thread = threading.Thread(target=self._run_job, name="smi job", daemon=True)
            self.job_thread.start()
        self.set_interval(FRAME_SECONDS, self.repaint)
        self.set_interval(LIVENESS_SECONDS, self.check_liveness)
        self.check_liveness()
        self.repaint()

    def _run_job(self) -> None:
        try:
            self.job()
            self.post_message(EngineFinished())
        except RunInterrupted:
            self.post_message(EngineFinished(interrupted=True))
        except Exception as exc:  # shown in the dashboard; the CLI reports it after exit
            self.post_message(EngineFinished(error=str(exc) or type(exc).__name__))

    def on_events_arrived(self, message: EventsArrived) -> None:
        self.views[message.run].apply(message.events)

    def on_engine_finished(self, message: EngineFinished) -> None:
        self.job_running = False
        self.job_error, self.job_interrupted = message.error, message.interrupted
        if message.interrupted and self.control is not None and self.control.stop_requested and getattr(self, "_quit_after_stop", False):
            self.exit()
        elif message.error:
            self.notify(f"the run failed: {plain(message.error)}", severity="error", timeout=30, markup=False)

    @property
    def views(self) -> list[RunView]:
        return list(self.query(RunView))

    def check_liveness(self, views: list[RunView] | None = None) -> None:
        for view in self.views if views is None else views:
            view.check_liveness(self.clock() if self.clock else (view.state.latest or 0.0))

    def repaint(self) -> None:
        views = self.views
        if not any(view.dirty for view in views):
            return
        self.check_liveness([view for view in views if view.dirty])  # new events may have ended the run
        scale = shared_scale([loss_series(view.state) for view in views]) if len(views) > 1 else {}
        for view in views:
            view.repaint(scale)
        if len(self.run_dirs) > 1:
            self.query_one("#compare", Static).update(self._comparison())

    def _comparison(self) -> Text:
        """Wall-clock seconds per iteration so far, run against run: the same basis as the demo
        table's speedup (which is this ratio over whole runs). The verdict comes first, and the
        line wraps rather than cut, so a narrow terminal keeps what the comparison says."""
        timed = [(plain(view.run_dir.name), view.state.seconds_per_iteration) for view in self.views]
        known = [(name, t) for name, t in timed if t]
        text = Text()
        if len(known) > 1:
            (fast, fastest), (slow, slowest) = min(known, key=lambda k: k[1]), max(known, key=lambda k: k[1])
            verdict = f"{fast} is {slowest / fastest:.2f}x faster than {slow}" if slowest > fastest else "the same speed"
            text.append(verdict, "bold green" if slowest > fastest else "bold")
            text.append(" · ")
        text.append("wall-clock per iteration so far: ", "bold")
        text.append(" · ".join(f"{name} {'-' if t is None else f'{1000 * t:.1f} ms'}" for name, t in timed))
        return text

    # -- keys -----------------------------------------------------------------------------------
    def action_quit_dashboard(self) -> None:
        if not self.job_running:
            self.exit()
            return

        def answered(stop: bool | None) -> None:
            if stop:
                self._quit_after_stop = True
                self.control.request_stop()
                self.notify("stopping after this iteration…")

        self.push_screen(Confirm("Stop the run and quit? It saves a checkpoint; continue with --resume."), answered)

    def action_pause(self) -> None:
        if self.control is None or not self.job_running:
            self.notify("pausing works for a run started in this process (smi invert --tui)", severity="warning")
            return
        if self.control.paused:
            self.control.resume()
            self.notify("resumed")
        else:
            self.control.pause()
            self.notify("paused: p resumes")
        self.sub_title = "PAUSED" if self.control.paused else ""
        for view in self.views:  # at once; the run's paused/unpaused events follow through its log
            view.state.paused, view.dirty = self.control.paused, True
        self.check_liveness()

    def action_screenshot(self) -> None:
        path = self.run_dirs[0] / f"screenshot-{dt.datetime.now():%Y%m%d-%H%M%S}.svg"
        write_bytes(path, self.export_screenshot().encode())
        self.notify(f"saved {plain(path)}", markup=False)

    def action_stop_run(self) -> None:
        live = [view for view in self.views if not view.liveness.ended]
        if not live:  # nothing to ask: say so, and write nothing into a finished or dead run
            self.notify(" · ".join(f"{plain(v.run_dir.name)} is {v.liveness.status}"
                                   + (f" ({v.liveness.reason})" if v.liveness.reason else "") for v in self.views)
                        + ": nothing to stop", severity="warning", markup=False)
            return

        def answered(stop: bool | None) -> None:
            if not stop:
                return
            if self.control is not None:
                self.control.request_stop()
            else:
                for view in live:
                    RunDir(view.run_dir).request("stop")
            self.notify("asked the run to stop; it saves a checkpoint first")

        self.push_screen(Confirm("Ask the run to stop cleanly?"), answered)

    def action_keys(self) -> None:
        self.push_screen(Keys())

    def on_unmount(self) -> None:
        for follower in self.followers:
            follower.stop()


def shared_scale(runs: list[dict[str, list[float]]]) -> dict[str, tuple[float, float]]:
    """One (low, high) per loss term over every run that has it: side by side, equal heights mean equal losses."""
    scale: dict[str, tuple[float, float]] = {}
    for series in runs:
        for name, values in series.items():
            finite = [v for v in values if v == v and abs(v) != float("inf")]
            if finite:
                low, high = scale.get(name, (min(finite), max(finite)))
                scale[name] = (min(low, *finite), max(high, *finite))
    return scale
