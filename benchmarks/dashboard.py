"""Dashboard responsiveness: a writer appends inversion events to events.jsonl at a fixed rate
while the dashboard (headless, real rendering) follows the file; reported per rate: how far
behind the dashboard's state is (event written -> folded), how often and how long it repaints.

    python benchmarks/dashboard.py [--rates 1000,5000,20000] [--seconds 5]

Also writes benchmarks/results/dashboard.json and, with --screenshot FILE.svg, a screenshot of
the dashboard on the tests' recorded run, or on ``--runs DIR [DIR]`` (the README image is
rendered from one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from smi_cli.dashboard.app import Dashboard, RunView
from smi_cli.watch import run_kind
from smi_engine.runs.events import read_events

from results_io import save_results

RECORDED = Path(__file__).parent.parent / "tests" / "data" / "recorded-sparse"


class TimedDashboard(Dashboard):
    """The real app, noting when events arrive and how long repaints take."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lags: list[float] = []
        self.repaints: list[float] = []

    def on_events_arrived(self, message) -> None:  # Textual then also runs Dashboard's handler
        now = time.time()
        self.lags += [now - e["time"] for e in message.events if e.get("event") == "iteration"]

    def repaint(self) -> None:
        started = time.perf_counter()
        super().repaint()
        self.repaints.append(time.perf_counter() - started)


def writer(path: Path, template: list[dict], rate: int, seconds: float, done: threading.Event) -> int:
    """Append iteration events (a stop every 500) at ``rate`` per second; returns how many."""
    iteration = [e for e in template if e["event"] == "iteration"][0]
    stop = [e for e in template if e["event"] == "stop"][0]
    written, started = 0, time.perf_counter()
    with open(path, "a") as handle:
        while time.perf_counter() - started < seconds:
            due = int((time.perf_counter() - started) * rate)
            lines = []
            while written < due:
                event = dict(stop if written % 500 == 499 else iteration, time=time.time(), iteration=written % 4000)
                lines.append(json.dumps(event))
                written += 1
            if lines:
                handle.write("\n".join(lines) + "\n")
                handle.flush()
            time.sleep(0.001)
    done.set()
    return written


def measure(rate: int, seconds: float) -> dict:
    folder = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(RECORDED, folder)
    template = read_events(folder / "events.jsonl")
    (folder / "events.jsonl").write_text("\n".join(json.dumps(e) for e in template if e["event"] == "run_start") + "\n")
    app = TimedDashboard([folder], ["invert"])
    result: dict = {}

    async def main() -> None:
        async with app.run_test(size=(140, 44)) as pilot:
            await pilot.pause(0.3)
            app.repaints.clear()
            done = threading.Event()
            thread = threading.Thread(target=lambda: result.update(written=writer(folder / "events.jsonl", template, rate, seconds, done)))
            thread.start()
            while not done.is_set():
                await pilot.pause(0.05)
            thread.join()
            deadline = time.time() + 30
            while len(app.lags) < result["written"] - result["written"] // 500 and time.time() < deadline:
                await pilot.pause(0.05)
            result["folded"] = app.views[0].state.events - 1  # minus run_start

    asyncio.run(main())
    lags = sorted(app.lags)
    return {
        "rate": rate, "seconds": seconds, "events_written": result["written"],
        "events_folded": result["folded"],
        "lag_ms_p50": 1000 * statistics.median(lags), "lag_ms_p99": 1000 * lags[int(0.99 * (len(lags) - 1))],
        "lag_ms_max": 1000 * lags[-1],
        "repaints_per_s": len(app.repaints) / seconds,
        "repaint_ms_mean": 1000 * statistics.mean(app.repaints), "repaint_ms_max": 1000 * max(app.repaints),
    }


def screenshot(target: Path, runs: list[Path]) -> None:
    app = Dashboard(runs, [run_kind(run) for run in runs], follow=False)

    async def main() -> None:
        async with app.run_test(size=(140, 44)) as pilot:
            started = time.perf_counter()
            while not all(view.state.finished for view in app.query(RunView)):
                await pilot.pause(0.1)
            print(f"caught up with {len(runs)} finished run(s) in {time.perf_counter() - started:.2f} s")
            await pilot.pause(1.0)  # the last throttled repaint
            target.write_text(app.export_screenshot())

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1000,5000,20000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--runs", type=Path, nargs="+", default=[RECORDED], help="run directories in the screenshot")
    opts = parser.parse_args()
    if opts.screenshot:
        screenshot(opts.screenshot, opts.runs)
        print(f"wrote {opts.screenshot}")
        return
    results = [measure(int(rate), opts.seconds) for rate in opts.rates.split(",")]
    print("| events/s written | folded | lag p50 (ms) | lag p99 (ms) | repaints/s | repaint mean / max (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rate']:,} | {r['events_folded']:,}/{r['events_written']:,} | {r['lag_ms_p50']:.0f} | {r['lag_ms_p99']:.0f} | "
              f"{r['repaints_per_s']:.1f} | {r['repaint_ms_mean']:.1f} / {r['repaint_ms_max']:.1f} |")
    print(f"wrote {save_results('dashboard', results)}")


if __name__ == "__main__":
    main()
