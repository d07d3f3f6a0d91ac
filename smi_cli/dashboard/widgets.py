"""The dashboard's panels. Each renders a RunState; none reads files but the preview."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from smi_cli.dashboard.drawing import bar_chart, half_blocks
from smi_cli.console import STATUS_STYLES, plain
from smi_engine.runs.state import RunState
from smi_cli.progress import duration
from smi_engine.runs.liveness import Liveness
from smi_engine.errors import SmiError
from smi_engine.inversion.preview import read_preview, split_tiles

COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red")
KEPT, STOPPED = "█", "·"


class Panel(Static):
    """A bordered panel that re-renders from the run state."""

    TITLE = ""
    shown: tuple[RunState, Path] | None = None
    liveness: Liveness | None = None  # set by the view: needs the clock and the run's lock

    def on_mount(self) -> None:
        self.border_title = self.TITLE

    def on_resize(self) -> None:  # sizes are known only after layout: draw again at the real size
        if self.shown is not None:
            self.show(*self.shown)

    def show(self, state: RunState, run_dir: Path) -> None:
        self.shown = (state, run_dir)
        self.update(self.render_state(state, run_dir))

    def live(self, state: RunState) -> Liveness:
        """How the run stands: the view's reading (clock and lock), else what the events say."""
        return self.liveness or Liveness(state.status)

    def render_state(self, state: RunState, run_dir: Path):  # pragma: no cover - abstract
        raise NotImplementedError


class RunHeader(Panel):
    """Three lines, whatever the run, so that runs side by side stay aligned: who and how it
    stands; where it is; what it runs on."""

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        live = self.live(state)
        text = Text()
        text.append(f"{plain(run_dir.name)}  ", "bold")
        text.append(live.status.upper(), STATUS_STYLES.get(live.status, ""))
        if live.reason:
            text.append(f" ({live.reason})", STATUS_STYLES.get(live.status, ""))
        text.append(f"  {state.model} · {state.device}")
        if not state.model_has_weights:
            text.append("  random weights: the images will not look like data", "bold yellow")
        text.append("\n")
        if state.is_training:
            unit = "round" if state.kind == "distill" else "epoch"
            text.append(f"{unit} {max(state.current_epoch + 1, 0)}/{state.epochs} · step {state.done_steps}/{state.total_steps or '?'}")
        else:
            text.append(f"batch {min(state.batch + 1, max(state.batches, 1))}/{state.batches} · "
                        f"iteration {max(state.iteration + 1, 0)}/{state.iterations} · schedule {state.schedule or 'dense'}")
            if state.selection and state.schedule not in ("", "dense"):
                text.append(f" · selection {state.selection}")
            if state.world_size > 1:
                text.append(f" · {state.world_size} ranks")
        text.append("\n")
        resources = [f"RSS {state.rss_mb:.0f} MB"] if state.rss_mb is not None else []
        if state.cuda_peak_mb is not None:
            resources.append(f"CUDA peak {state.cuda_peak_mb:.0f} MB")
        if state.gpu:
            resources.append(gpu_text(state.gpu))
        text.append(" · ".join(resources) or "resources: -", "dim")
        if state.damaged:
            text.append(f" · {state.damaged} damaged event line(s) skipped", "yellow")
        return text


def gpu_text(gpu: dict) -> str:
    return (f"GPU {gpu['utilization']:.0f}% · {gpu['memory_used_mb'] / 1024:.1f}/{gpu['memory_total_mb'] / 1024:.0f} GB"
            f" · {gpu['temperature_c']:.0f}°C")


class PatchRetention(Panel):
    """The patch grid of each image of the current batch, kept/total, and the stop timeline."""

    TITLE = "Patch retention"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        rows, cols = state.grid
        text = Text()
        if not rows:
            return Text("waiting for the run to start…", "dim")
        text.append(f"{state.kept}/{state.num_patches}", "bold")
        # Short enough for the half of an 80-column screen this panel gets.
        text.append(f" kept ({100 * state.kept / max(state.num_patches, 1):.0f}%) · batch {state.batch + 1}/{state.batches}\n")
        text.append_text(self._timeline(state))
        grids = state.keep or [range(state.num_patches)]
        fit = max(1, ((self.size.width or 60) + 2) // (cols + 2))
        shown = grids[: fit * max(1, ((self.size.height or 20) - 3) // (rows + 1))]
        # On the border, which no cut can hide: how many of the batch's images are drawn.
        self.border_subtitle = f"{len(shown)} of {len(grids)} images drawn" if len(shown) < len(grids) else ""
        # Past what the panel can show, a grid is cut (a damaged log may claim any size up to the
        # reader's bound): the drawing work stays that of one screen.
        drawn_rows, drawn_cols = min(rows, self.size.height or 20), min(cols, self.size.width or 60)
        for start in range(0, len(shown), fit):
            text.append("\n")
            sets = [g if isinstance(g, range) else set(g) for g in shown[start:start + fit]]
            for r in range(drawn_rows):
                for position, kept in enumerate(sets):
                    if position:
                        text.append("  ")
                    for c in range(drawn_cols):
                        on = r * cols + c in kept
                        text.append(KEPT if on else STOPPED, "green" if on else "grey37")
                text.append("\n")
        return text

    def _timeline(self, state: RunState) -> Text:
        width = max(10, self.size.width or 60)
        line = ["─"] * width
        for iteration, _ in state.stops:
            line[min(width - 1, iteration * width // max(state.iterations, 1))] = "▼"
        text = Text("".join(line), "grey50")
        at = min(width - 1, max(state.iteration, 0) * width // max(state.iterations, 1))
        text.stylize("bold yellow", at, at + 1)
        stops = ", ".join(f"{i}:{r:.3g}" for i, r in state.stops) or "none (dense)"  # every:V's nominal 1/3, 1/7 in 3 digits
        return text + Text(f"\nstops {stops}", "dim")


class LossChart(Panel):
    """A live line chart per loss term. Side by side, the app sets one scale per term for all runs."""

    TITLE = "Loss"
    scale: dict[str, tuple[float, float]] = {}

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        series = loss_series(state)
        if not series:
            return Text("no steps yet" if state.is_training else "no iterations yet", "dim")
        names = [n for n in series if n != "total"] + (["total"] if "total" in series else [])
        width = max(10, self.size.width or 60)
        chart_rows = max(1, ((self.size.height or 20) - len(names)) // len(names))
        text = Text()
        for index, name in enumerate(names):
            values = series[name]
            colour = COLOURS[index % len(COLOURS)]
            low, high = self.scale.get(name, (min(values), max(values)))
            text.append(f"{name}", f"bold {colour}")
            text.append(f"  {values[-1]:.4g}  (axis {low:.4g}-{high:.4g})\n", "dim")
            for line in bar_chart(values, width, chart_rows, low=low, high=high):
                text.append(line + "\n", colour)
        return text


def loss_series(state: RunState) -> dict[str, list[float]]:
    """The loss series a run's chart draws: inversion terms, or the training loss per step."""
    if state.is_training:
        return {"train loss" if state.kind == "teacher" else "kt loss": state.train_loss} if state.train_loss else {}
    return state.losses.series


class Throughput(Panel):
    TITLE = "Throughput"

    def render_state(self, state: RunState, run_dir: Path) -> Table:
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold", no_wrap=True, min_width=len("token FLOPs"))  # the names never give way
        table.add_column(no_wrap=True, overflow="ellipsis")
        status = self.live(state).status
        eta = {"finished": "done", "paused": "paused", "dead": "- (the run died)", "failed": "- (failed)",
               "interrupted": "- (stopped)"}.get(status) or duration(state.eta_seconds)
        if state.is_training:
            rate = state.done_steps / state.clock.active if state.clock.active else 0.0
            rows = [("steps/s", f"{rate:,.2f}"), ("steps", f"{state.done_steps}/{state.total_steps or '?'}")]
        else:
            flops = state.flops_fraction
            rows = [
                # images written to the pool (a Patch Rebirth trajectory writes several), not batch x it/s
                ("images", f"{state.images_made}/{state.total_images}"),
                ("images/s", "-" if state.images_per_second is None else f"{state.images_per_second:,.2f}"),
                ("speed", f"{state.iteration_rate:,.1f} it/s · {sum(state.tokens_per_s.values()) / 1000:,.1f}k tok/s"),
                # the cost model, not a speedup: speedups are measured in wall-clock time only
                ("token FLOPs", "-" if flops is None else f"{100 * flops:.0f}% of dense so far"),
            ]
        # One short row for both durations (active time, of the time since start): at 80x24,
        # beside a Problem panel, every row shows whole.
        times = [("active", f"{duration(state.clock.active)} of {duration(state.clock.since_start)}")]
        for key, value in [*rows, *times, ("ETA", eta)]:
            table.add_row(key, value)
        return table


class Preview(Panel):
    """The newest preview PNG (stopped patches greyed), in half-block characters."""

    TITLE = "Preview"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown: tuple[str | None, int, tuple[int, int]] = (None, -1, (0, 0))

    def show(self, state: RunState, run_dir: Path) -> None:
        self.shown = (state, run_dir)
        key = (state.preview, state.preview_version, (self.size.width, self.size.height))
        if key == self._shown:
            return
        self._shown = key
        if state.preview is None:
            self.update(Text("the first preview comes at the first stop or batch end", "dim"))
            return
        try:
            tiles = split_tiles(read_preview(run_dir, state.preview), state.batch_size or 1)
        except (OSError, SmiError, Image.DecompressionBombError):
            self.update(Text(f"preview {state.preview} not readable yet", "dim"))
            return
        self.update(self._mosaic(tiles))
        self.border_subtitle = state.preview

    def _mosaic(self, tiles: list[Image.Image]) -> Text:
        """As many images as fit at a readable size (at least 16 cells across), side by side."""
        width, height = max(self.size.width, 8), max(self.size.height, 4)
        across = max(1, min(len(tiles), width // 17))
        side = min((width - across + 1) // across, 2 * height)
        down = max(1, min(height // max(side // 2, 1), -(-len(tiles) // across)))
        text = Text()
        for r in range(down):
            row = [half_blocks(t, side, side // 2).split() for t in tiles[r * across:(r + 1) * across]]
            for line in range(max((len(lines) for lines in row), default=0)):
                for i, lines in enumerate(row):
                    if i:
                        text.append(" ")
                    if line < len(lines):
                        text.append_text(lines[line])
                text.append("\n")
        return text


class Training(Panel):
    """Rounds of a distillation, or epochs of a teacher's training: validation top-1 per
    validation, on a 0-100 % axis."""

    def on_mount(self) -> None:
        self.border_title = "Training"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        self.border_title = "Knowledge transfer" if state.kind == "distill" else "Teacher training"
        unit = "round" if state.kind == "distill" else "epoch"
        text = Text()
        text.append(f"{unit} {max(state.current_epoch + 1, 0)}/{state.epochs}", "bold")
        text.append(f" · step {state.done_steps}/{state.total_steps or '?'}")
        if not state.val_top1:
            text.append("\nwaiting for the first validation", "dim")
            return text
        text.append(f"\nvalidation top-1 {state.val_top1[-1]:.2f}% (best {max(state.val_top1):.2f}%) "
                    f"after {unit} {state.val_epochs[-1]}\n")
        width = max(10, (self.size.width or 60) - 5)
        rows = bar_chart(state.val_top1, width, max(2, (self.size.height or 10) - 4), low=0.0, high=100.0)
        for index, line in enumerate(rows):
            label = "100%" if index == 0 else ("  0%" if index == len(rows) - 1 else "    ")
            text.append(label + " ", "dim")
            text.append(line + "\n", "green")
        text.append(f"     {unit} 1 → {state.val_epochs[-1]}", "dim")
        return text


class Problem(Panel):
    TITLE = "Problem"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        if state.error:
            return Text(f"the run failed: {state.error}", "bold red")
        live = self.live(state)
        if not (state.interrupted or live.status == "dead"):
            return Text("")
        what = state.interrupted or f"the process writing this run died ({live.reason or 'no end event'})"
        if state.kind != "invert":
            return Text(what, "yellow")
        # The resume command on a line of its own, so that no panel width cuts it.
        return Text(f"{what}; continue with:\nsmi invert --resume --out {plain(run_dir)}", "yellow")
