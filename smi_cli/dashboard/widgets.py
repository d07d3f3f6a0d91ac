"""The dashboard's panels. Each renders a RunState; none reads files but the preview."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from smi_cli.dashboard.drawing import bar_chart, half_blocks
from smi_cli.dashboard.state import RunState
from smi_engine.preview import split_tiles

COLOURS = ("cyan", "magenta", "yellow", "green", "blue", "red")
KEPT, STOPPED = "█", "·"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Panel(Static):
    """A bordered panel that re-renders from the run state."""

    TITLE = ""
    shown: tuple[RunState, Path] | None = None

    def on_mount(self) -> None:
        self.border_title = self.TITLE

    def on_resize(self) -> None:  # sizes are known only after layout: draw again at the real size
        if self.shown is not None:
            self.show(*self.shown)

    def show(self, state: RunState, run_dir: Path) -> None:
        self.shown = (state, run_dir)
        self.update(self.render_state(state, run_dir))

    def render_state(self, state: RunState, run_dir: Path):  # pragma: no cover - abstract
        raise NotImplementedError


class RunHeader(Panel):
    def render_state(self, state: RunState, run_dir: Path) -> Text:
        status = {"running": "green", "finished": "bold green", "failed": "bold red", "interrupted": "yellow"}[state.status]
        text = Text()
        text.append(f"{run_dir.name}  ", "bold")
        text.append(state.status.upper(), status)
        text.append(f"  {state.model} · {state.device}")
        if state.kind == "invert":
            text.append(f" · schedule {state.schedule or 'dense'}")
            text.append(f"\niteration {max(state.iteration + 1, 0)}/{state.iterations} · batch {state.batch + 1}/{state.batches}")
            if state.world_size > 1:
                text.append(f" · {state.world_size} ranks")
        else:
            text.append(f"\nepoch {state.epoch + 1}/{state.epochs}")
        memory = [f"RSS {state.rss_mb:.0f} MB"] if state.rss_mb is not None else []
        if state.cuda_peak_mb is not None:
            memory.append(f"CUDA peak {state.cuda_peak_mb:.0f} MB")
        if memory:
            text.append(" · " + " · ".join(memory))
        if state.damaged:
            text.append(f"\n{state.damaged} damaged event line(s) skipped", "yellow")
        return text


class PatchRetention(Panel):
    """The patch grid of each image of the current batch, kept/total, and the stop timeline."""

    TITLE = "Patch retention"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        rows, cols = state.grid
        text = Text()
        if not rows:
            return Text("waiting for the run to start…", "dim")
        text.append(f"{state.kept}/{state.num_patches}", "bold")
        text.append(f" patches kept ({100 * state.kept / max(state.num_patches, 1):.0f}%) in batch {state.batch + 1}\n")
        text.append_text(self._timeline(state))
        grids = state.keep or [list(range(state.num_patches))]
        fit = max(1, ((self.size.width or 60) + 2) // (cols + 2))
        shown = grids[: fit * max(1, ((self.size.height or 20) - 3) // (rows + 1))]
        for start in range(0, len(shown), fit):
            text.append("\n")
            sets = [set(g) for g in shown[start:start + fit]]
            for r in range(rows):
                for position, kept in enumerate(sets):
                    if position:
                        text.append("  ")
                    for c in range(cols):
                        on = r * cols + c in kept
                        text.append(KEPT if on else STOPPED, "green" if on else "grey37")
                text.append("\n")
        if len(shown) < len(grids):
            text.append(f"(+{len(grids) - len(shown)} more images)", "dim")
        return text

    def _timeline(self, state: RunState) -> Text:
        width = max(10, self.size.width or 60)
        line = ["─"] * width
        for iteration, _ in state.stops:
            line[min(width - 1, iteration * width // max(state.iterations, 1))] = "▼"
        text = Text("".join(line), "grey50")
        at = min(width - 1, max(state.iteration, 0) * width // max(state.iterations, 1))
        text.stylize("bold yellow", at, at + 1)
        stops = ", ".join(f"{i}:{r:g}" for i, r in state.stops) or "none (dense)"
        return text + Text(f"\nstops {stops}", "dim")


class LossChart(Panel):
    """A live line chart per loss term."""

    TITLE = "Loss"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        series = state.losses.series
        if not series:
            return Text("no iterations yet", "dim")
        names = [n for n in series if n != "total"] + (["total"] if "total" in series else [])
        width = max(10, self.size.width or 60)
        chart_rows = max(1, ((self.size.height or 20) - len(names)) // len(names))
        text = Text()
        for index, name in enumerate(names):
            values = series[name]
            colour = COLOURS[index % len(COLOURS)]
            text.append(f"{name}", f"bold {colour}")
            text.append(f"  {values[-1]:.4g}  (min {min(values):.4g}, max {max(values):.4g})\n", "dim")
            for line in bar_chart(values, width, chart_rows):
                text.append(line + "\n", colour)
        return text


class Throughput(Panel):
    TITLE = "Throughput"

    def render_state(self, state: RunState, run_dir: Path) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        images = sum(state.images_per_s.values())
        tokens = sum(state.tokens_per_s.values())
        now, so_far = state.speedup_now, state.speedup_so_far
        rows = [
            ("images/s", f"{images:,.1f}"),
            ("tokens/s", f"{tokens:,.0f}"),
            ("iterations/s", f"{state.iteration_rate:,.2f}"),
            ("elapsed", _duration(state.elapsed)),
            ("ETA", _duration(state.eta_seconds) if not state.finished else "done"),
            # dense-equivalent: how much faster than this run would be without stopping (cost model)
            ("speedup vs dense", "-" if so_far is None else f"{now:.2f}x now · {so_far:.2f}x so far"),
        ]
        for key, value in rows:
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
            with Image.open(run_dir / state.preview) as image:
                tiles = split_tiles(image.convert("RGB"), state.batch_size or 1)
        except OSError:
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
    """Epochs of a distillation (or teacher) run: validation accuracy per epoch."""

    TITLE = "Knowledge transfer"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        if not state.val_top1:
            return Text(f"epoch {state.epoch + 1}/{state.epochs}: waiting for the first validation", "dim")
        text = Text()
        text.append(f"epoch {state.epoch + 1}/{state.epochs}", "bold")
        text.append(f" · validation top-1 {state.val_top1[-1]:.2f}% (best {max(state.val_top1):.2f}%)\n")
        width = max(10, self.size.width or 60)
        for line in bar_chart(state.val_top1, width, max(2, (self.size.height or 10) - 3), low=0.0, high=100.0):
            text.append(line + "\n", "green")
        return text


class Problem(Panel):
    TITLE = "Problem"

    def render_state(self, state: RunState, run_dir: Path) -> Text:
        if state.error:
            return Text(f"the run failed: {state.error}", "bold red")
        if state.interrupted:
            return Text(f"{state.interrupted}; continue with: smi invert --resume --out {run_dir}", "yellow")
        return Text("")
