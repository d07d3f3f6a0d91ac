"""The dashboard: state folding, the Textual app driven by Pilot, snapshots, a real terminal."""

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from smi_cli.dashboard.app import Confirm, Dashboard, Keys
from smi_engine.runs.state import RunState
from smi_cli.dashboard.widgets import LossChart, PatchRetention, Problem, RunHeader, Throughput, Training
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.runs.events import read_events
from smi_engine.runs.rundir import RunDir

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, smi

RECORDED = Path(__file__).parent / "data" / "recorded-sparse"
SIZE = (140, 44)


def plain(widget) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(widget.content)
    return console.export_text()


@pytest.fixture
def recorded(tmp_path) -> Path:
    target = tmp_path / "recorded-sparse"
    shutil.copytree(RECORDED, target)
    return target


def run_app(app: Dashboard, steps, size=SIZE):
    """Run the app headless; ``steps(app, pilot)`` is an async function of the test."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await pilot.pause(0.2)
            await steps(app, pilot)

    asyncio.run(main())


def test_state_folds_the_recorded_run():
    state = RunState()
    kept_after_stops = []
    for event in read_events(RECORDED / "events.jsonl"):
        state.apply(event)
        if event["event"] == "stop":
            kept_after_stops.append((state.batch, state.kept, len(state.keep), len(state.keep[0])))
    assert kept_after_stops == [(0, 44, 4, 44), (0, 22, 4, 22), (1, 44, 4, 44), (1, 22, 4, 22)]
    assert state.finished and state.status == "finished" and state.batches_done == 2
    assert state.done_iterations == state.total_iterations == 24
    # An older recording: batch_end without its image count means batch_size images per batch.
    assert state.images_made == state.total_images == 8 and state.images_per_second > 0
    assert len(state.losses.series["deepinversion.ce"]) == 24
    assert 0.0 < state.flops_fraction < 1.0 and state.seconds_per_iteration > 0 and state.eta_seconds is None
    assert state.preview == "previews/batch-00001-it00012.png"


def test_dashboard_follows_a_growing_file_with_a_half_written_line(recorded):
    events = (recorded / "events.jsonl").read_text().splitlines(keepends=True)
    first_stop = next(i for i, line in enumerate(events) if '"event":"stop"' in line)
    second_stop = next(i for i, line in enumerate(events) if i > first_stop and '"event":"stop"' in line)
    (recorded / "events.jsonl").write_text("".join(events[: first_stop + 1]))

    async def steps(app, pilot):
        retention = app.query_one(PatchRetention)
        assert "44/64 kept (69%) · batch 1" in plain(retention)
        assert "RUNNING" in plain(app.query_one(RunHeader))
        with open(recorded / "events.jsonl", "a") as handle:
            handle.write("".join(events[first_stop + 1 : second_stop + 1]))
            handle.write(events[second_stop + 1][:25])  # half a line: the writer is mid-way
        await pilot.pause(0.5)
        assert "22/64 kept (34%)" in plain(retention)
        seen = app.views[0].state.events
        with open(recorded / "events.jsonl", "a") as handle:
            handle.write(events[second_stop + 1][25:] + "".join(events[second_stop + 2 :]))
        await pilot.pause(0.5)
        state = app.views[0].state
        assert state.events == len(events) and state.events > seen
        assert "FINISHED" in plain(app.query_one(RunHeader))
        assert "ETA" in plain(app.query_one(Throughput)) and "done" in plain(app.query_one(Throughput))
        assert "images 8/8" in " ".join(plain(app.query_one(Throughput)).split())  # made, not batch x it/s
        assert "deepinversion.ce" in plain(app.query_one(LossChart))

    recorded_at = json.loads(events[first_stop])["time"]  # the clock of the recording, not of today
    run_app(Dashboard([recorded], ["invert"], clock=lambda: recorded_at), steps)


def test_a_finished_recording_larger_than_a_read_chunk_is_read_to_its_end(recorded):
    from smi_cli.dashboard.follower import CHUNK

    lines = (recorded / "events.jsonl").read_text().splitlines(keepends=True)
    iteration = next(line for line in lines if '"event":"iteration"' in line)
    padding = iteration * (2 * CHUNK // len(iteration) + 1)  # the same iteration again: state is unchanged but for counts
    (recorded / "events.jsonl").write_text("".join(lines[:-1]) + padding + lines[-1])

    async def steps(app, pilot):
        assert app.views[0].state.finished
        assert "FINISHED" in plain(app.query_one(RunHeader))

    run_app(Dashboard([recorded], ["invert"], follow=False), steps)


def test_keys_screenshot_stop_request_help_and_quit(recorded):
    async def steps(app, pilot):
        await pilot.press("question_mark")
        assert isinstance(app.screen, Keys)
        await pilot.press("escape")
        await pilot.press("s")
        await pilot.pause(0.1)
        shots = list(recorded.glob("screenshot-*.svg"))
        assert len(shots) == 1 and "retention" in shots[0].read_text()  # SVG text: spaces are &#160;
        await pilot.press("x")  # the run is finished: it says so, asks nothing and writes nothing
        assert not isinstance(app.screen, Confirm) and not RunDir(recorded).control.exists()
        await pilot.press("p")  # nothing to pause in a watched run: it says so and carries on
        await pilot.press("q")
        await pilot.pause(0.1)
        assert not app.is_running

    run_app(Dashboard([recorded], ["invert"], follow=False), steps)


def unfinished_copy(recorded: Path, target: Path) -> Path:
    """The recorded run as it was before its last batch ended (no run_end, no summary)."""
    shutil.copytree(recorded, target)
    (target / "summary.json").unlink()
    lines = (target / "events.jsonl").read_text().splitlines(keepends=True)
    last_batch = max(i for i, line in enumerate(lines) if '"batch_end"' in line)
    (target / "events.jsonl").write_text("".join(lines[:last_batch]))
    return target


def test_x_asks_a_running_run_to_stop(recorded, tmp_path):
    run = unfinished_copy(recorded, tmp_path / "unfinished")

    async def steps(app, pilot):
        header = plain(app.query_one(RunHeader))
        assert "RUNNING" in header and "random weights" in header  # visible under --tui too
        await pilot.press("x")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        assert RunDir(run).pending_request() == "stop"

    run_app(Dashboard([run], ["invert"], follow=False), steps)


def test_a_failed_run_shows_its_error(recorded):
    with open(recorded / "events.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "run_error", "time": 1.0, "rank": 0, "message": "CUDA out of memory"}) + "\n")

    async def steps(app, pilot):
        problem = app.query_one(Problem)
        assert problem.display and "the run failed: CUDA out of memory" in plain(problem)
        assert "FAILED" in plain(app.query_one(RunHeader))

    run_app(Dashboard([recorded], ["invert"], follow=False), steps)


def test_two_runs_side_by_side_compare_throughput(recorded, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(recorded, other)
    lines = []
    for event in read_events(other / "events.jsonl"):  # the same run, twice as slow per iteration
        if event["event"] == "iteration":
            event["seconds"] *= 2
            event["losses"] = {name: 2 * value for name, value in event["losses"].items()}
        lines.append(json.dumps(event))
    (other / "events.jsonl").write_text("\n".join(lines) + "\n")

    async def steps(app, pilot):
        assert len(app.views) == 2
        text = plain(app.query_one("#compare"))
        assert "recorded-sparse is 2.00x faster than other" in text  # wall-clock, as the demo table
        charts = [plain(chart) for chart in app.query(LossChart)]
        axes = [re.findall(r"axis ([\d.e-]+)-([\d.e+-]+)\)", chart) for chart in charts]
        assert axes[0] == axes[1] and len(axes[0]) == 3  # one scale per term for both runs
        low, high = (float(v) for v in axes[0][0])
        assert high > 2 * low  # it spans the doubled run too

    run_app(Dashboard([recorded, other], ["invert", "invert"], follow=False), steps)


def _training_run(folder: Path, kind: str) -> Path:
    RunDir(folder).create({"config": {}}, kind)
    events = [{"event": "run_start", "time": 0.0, "rank": 0, "kind": kind, "teacher": "t", "student": "s", "model": "m",
               "epochs": 3, "device": "cpu", "total_steps": 6}]
    for i in range(3):
        events += [{"event": "train_step", "time": i + 0.5 * s, "rank": 0, "epoch": i, "epochs": 3, "step": s, "steps": 2,
                    "done_steps": 2 * i + s + 1, "loss": 2.0 / (i + 1)} for s in range(2)]
        events.append({"event": "epoch_end", "time": i + 1.0, "rank": 0, "epoch": i, "epochs": 3, "kt_loss": 2.0 / (i + 1),
                       "val_top1": 40.0 + 10 * i, "val_top5": 90.0, "best_top1": 40.0 + 10 * i})
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


@pytest.mark.parametrize("kind, title, unit", [("distill", "Knowledge transfer", "round"), ("teacher", "Teacher training", "epoch")])
def test_training_runs_get_training_panels(tmp_path, kind, title, unit):
    run = _training_run(tmp_path / kind, kind)

    async def steps(app, pilot):
        training = app.query_one(Training)
        text = plain(training)
        assert training.border_title == title and f"{unit} 3/3 · step 6/6" in text
        assert "validation top-1 60.00% (best 60.00%)" in text and "100%" in text and "0%" in text
        assert "loss" in plain(app.query_one(LossChart)) and not app.query(PatchRetention)
        assert "steps/s" in plain(app.query_one(Throughput))
        assert ("t -> s" if kind == "distill" else "m") in plain(app.query_one(RunHeader))

    run_app(Dashboard([run], [kind], follow=False), steps)


def test_in_process_pause_and_quit_asks_before_stopping(recorded, tmp_path):
    run = unfinished_copy(recorded, tmp_path / "unfinished")
    control = RunControl()

    def job():  # stands in for the engine: runs until asked to stop, honouring pauses
        while not control.should_stop():
            time.sleep(0.01)
        raise RunInterrupted("stopped", 0, 3)

    async def steps(app, pilot):
        await pilot.press("p")
        await pilot.pause(0.2)
        assert control.paused and app.sub_title == "PAUSED" and "PAUSED" in plain(app.query_one(RunHeader))
        assert "paused" in plain(app.query_one(Throughput))  # no frozen ETA
        await pilot.press("p")
        assert not control.paused
        await pilot.press("q")
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")
        assert app.job_running and not control.stop_requested
        await pilot.press("q")
        await pilot.press("y")
        await pilot.pause(0.5)
        assert control.stop_requested and app.job_interrupted

    run_app(Dashboard([run], ["invert"], control=control, job=job, follow=False), steps)


def test_main_screen_snapshot(snap_compare, recorded):
    assert snap_compare(Dashboard([recorded], ["invert"], follow=False), terminal_size=SIZE)


def test_side_by_side_snapshot(snap_compare, recorded, tmp_path):
    dense = tmp_path / "dense-copy"
    shutil.copytree(recorded, dense)
    assert snap_compare(Dashboard([recorded, dense], ["invert", "invert"], follow=False), terminal_size=SIZE)


def test_watch_refuses_missing_and_foreign_folders(tmp_path):
    proc = smi("watch", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "photos").mkdir()
    proc = smi("watch", tmp_path / "photos")
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_watch_stop_refuses_a_finished_run_and_writes_nothing(recorded):
    assert_one_line_error(smi("watch", recorded, "--stop"), "is finished", "nothing to stop")
    assert not RunDir(recorded).control.exists()


ANSI = re.compile(r"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])")


def _read_screen(fd: int, until: float, wanted: str) -> str:
    """What the terminal was sent until ``wanted`` shows up (or time runs out), as plain text."""
    raw, text = b"", ""
    while time.time() < until and wanted not in text:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                raw += os.read(fd, 65536)
            except OSError:
                break
            text = ANSI.sub("", raw.decode("utf-8", "ignore"))
    return text


@pytest.mark.slow
def test_smi_invert_tui_in_a_real_terminal(tmp_path):
    """The dashboard in a pseudo-terminal: it draws, q asks, y stops the run with a checkpoint."""
    out = tmp_path / "run"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 140, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smi_cli", "invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS,
         "--mean", "0.5", "--std", "0.5", "--iterations", "100000", "--batch-size", "2", "--schedule", "3:0.5",
         "--device", "cpu", "--out", str(out), "--tui"],
        stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "44"},
        close_fds=True,
    )
    os.close(slave)
    try:
        screen = _read_screen(master, time.time() + 60, "Throughput")
        assert "Patch retention" in screen and "Throughput" in screen and "Loss" in screen
        deadline = time.time() + 60
        while time.time() < deadline and not any(e["event"] == "stop" for e in read_events(out / "events.jsonl")):
            _read_screen(master, time.time() + 0.2, "\0")
        assert "32/64" in _read_screen(master, time.time() + 20, "32/64")  # the stop reached the screen
        os.write(master, b"q")
        assert "Stop the run" in _read_screen(master, time.time() + 20, "Stop the run")
        os.write(master, b"y")
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            _read_screen(master, time.time() + 0.2, "\0")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 130
    assert (out / "checkpoint.pt").is_file() and read_events(out / "events.jsonl")[-1]["event"] == "run_interrupted"


def _random_json(rng, depth: int = 0):
    """A random JSON value, biased towards event-like objects with wrong or missing fields."""
    kinds = ["null", "bool", "int", "float", "text", "list", "object", "event"] if depth < 3 else ["int", "text"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(2**40), 2**40)
    if kind == "float":
        return rng.choice([rng.uniform(-1e9, 1e9), 0.0, -0.0, 1e308])
    if kind == "text":
        return "".join(rng.choice("abc{}[]:,\"\\é\u2603") for _ in range(rng.randint(0, 8)))
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    names = ["event", "time", "batch", "iteration", "kept", "tokens", "losses", "stops", "grid", "kind", "epoch",
             "kept_indices", "path", "summary", "message", "seconds", "images_per_s", "tokens_per_s", "val_top1"]
    obj = {rng.choice(names): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 8))}
    if kind == "event":
        obj["event"] = rng.choice(["run_start", "run_resumed", "batch_start", "batch_resumed", "iteration", "stop",
                                   "preview", "batch_end", "epoch_end", "run_end", "run_error", "run_interrupted", "?"])
    return obj


def test_the_reader_survives_any_bytes_and_any_json():
    """Property test: random bytes and random JSON values never make the reader or the state
    raise; every complete line that is not a well-formed event is counted as damaged."""
    import random

    from smi_engine.runs.events import parse_lines

    rng = random.Random(0)
    for _ in range(300):
        state = RunState()
        data = b"".join(rng.choice([
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))),
            json.dumps(_random_json(rng)).encode(),
            b"\xff\xfe\x80 not utf-8",
            b"[1, 2, 3]", b"42", b'{"event": "iteration"}',
        ]) + b"\n" for _ in range(rng.randint(1, 30)))
        events, tail, damaged = parse_lines(data)
        for event in events:
            state.apply(event)
        assert all(isinstance(e, dict) for e in events)
        assert state.events + state.damaged == len(events) and damaged + len(events) <= data.count(b"\n")
        assert state.status in ("running", "finished", "failed", "interrupted")


def test_damaged_lines_are_counted_and_following_goes_on(recorded):
    """Non-UTF-8 bytes, JSON that is not an object, an event missing its fields: skipped and
    counted in the header; a run_error written after them is still shown."""
    with open(recorded / "events.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe not utf-8\n[1, 2, 3]\n42\n" + json.dumps({"event": "iteration"}).encode() + b"\n")
        handle.write(json.dumps({"event": "run_error", "time": 2.0, "rank": 0, "message": "disk full"}).encode() + b"\n")

    async def steps(app, pilot):
        header = plain(app.query_one(RunHeader))
        assert "4 damaged event line(s) skipped" in header and "FAILED" in header
        assert "disk full" in plain(app.query_one(Problem))

    run_app(Dashboard([recorded], ["invert"], follow=False), steps)
    run_app(Dashboard([recorded], ["invert"], follow=True), steps)


def test_the_dashboard_survives_hostile_events_appended_to_a_run(recorded):
    """Each of these crashed the dashboard (a Rich traceback, or a MemoryError) when appended to a
    run's log; now each is skipped as damage, or its bad field ignored, and every panel renders."""
    lines = (recorded / "events.jsonl").read_text().splitlines(keepends=True)
    iteration = json.loads(next(line for line in lines if '"event":"iteration"' in line))
    start = json.loads(lines[0])
    hostile = [
        {**iteration, "losses": {"total": float("nan")}}, {**iteration, "time": float("nan")},
        {**iteration, "rss_mb": "lots", "gpu": {"utilization": 5}}, {**iteration, "seconds": float("inf")},
        {**start, "grid": [30000, 30000], "num_patches": 900000000}, {**start, "stops": [[1, 2, 3], "x"]},
        {**start, "world_size": "many", "pid": "me"}, {**start, "batches": 10**12},
        {"event": "stop", "batch": 0, "kept": 4, "kept_indices": [[1, 2, 99999999999]]},
        {"event": "stop", "batch": 0, "kept": 4, "kept_indices": "everything"},
        {"event": "preview", "path": "../../../etc/passwd"}, {"event": "preview", "path": "previews/\x1b[2J.png"},
    ]
    text = "".join(lines[:-1]) + "".join(json.dumps(e) + "\n" for e in hostile)  # still running: no run_end
    (recorded / "events.jsonl").write_text(text)

    async def steps(app, pilot):
        await pilot.pause(0.5)
        state = app.views[0].state
        assert state.damaged >= 8 and state.grid == (8, 8) and state.world_size == 1
        assert state.rss_mb is None or isinstance(state.rss_mb, float)
        for panel in (RunHeader, PatchRetention, Throughput, LossChart):
            assert "Traceback" not in plain(app.query_one(panel))
        assert not app._exception

    run_app(Dashboard([recorded], ["invert"]), steps)


@pytest.mark.parametrize("seed, kind, size", [(0, "invert", SIZE), (1, "invert", (80, 24)), (2, "distill", SIZE),
                                              (3, "teacher", (80, 24)), (4, "invert", (60, 20))])
def test_every_panel_renders_hostile_events_without_control_characters(recorded, tmp_path, seed, kind, size):
    """Property test at the rendering level: real events of a run, each copied with some fields
    replaced by hostile values (NaN, huge numbers, wrong types, escapes, markup, bidi overrides),
    are appended to its log; every panel on screen then renders, and no control character
    reaches what it draws, its title or its subtitle."""
    import random

    from smi_engine.runs.state import OPTIONAL, REQUIRED
    from smi_cli.dashboard.widgets import Panel

    from .conftest import control_characters, hostile_value

    rng = random.Random(seed)
    run = recorded if kind == "invert" else _training_run(tmp_path / kind, kind)
    events = read_events(run / "events.jsonl")
    known = sorted({name for schema in (REQUIRED, OPTIONAL) for fields in schema.values() for name in fields})
    mutated = []
    for _ in range(150):
        event = dict(rng.choice(events))
        for field in rng.sample(sorted(event) + known, k=rng.randint(1, 3)):  # its own fields, or any reader's
            if field != "event" or rng.random() < 0.2:
                event[field] = hostile_value(rng)
        mutated.append(event)
    with open(run / "events.jsonl", "a") as handle:
        handle.writelines(json.dumps(e) + "\n" for e in mutated)

    async def steps(app, pilot):
        await pilot.pause(0.5)
        panels = list(app.query(Panel))
        assert {type(p).__name__ for p in panels} >= {"RunHeader", "LossChart", "Throughput"}
        for panel in panels:
            shown = plain(panel) + str(panel.border_title or "") + str(panel.border_subtitle or "")
            assert control_characters(shown) == [] and "Traceback" not in shown, type(panel).__name__
        assert not app._exception

    run_app(Dashboard([run], [kind]), steps, size=size)
