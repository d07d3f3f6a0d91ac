"""Running jobs as on a remote box: liveness, piped progress, `smi runs`, GPU readings, fast
start, help at 80 columns, the TensorBoard sink. Real subprocesses, real run directories."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from smi_cli.dashboard.app import Dashboard
from smi_engine.runs.state import RunState
from smi_cli.dashboard.widgets import PatchRetention, Problem, RunHeader, Throughput
from smi_cli.progress import InversionProgress, LogDisplay, TerminalDisplay
from smi_engine.runtime.gpu import open_monitor
from smi_engine.runs.liveness import STALL_FLOOR_SECONDS

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, read_events, smi
from .test_dashboard import RECORDED, plain, unfinished_copy

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")
ANSI = re.compile(r"\x1b\[")


def start_inversion(out: Path, *extra: str) -> subprocess.Popen:
    """A long inversion in the background, stderr piped, as under nohup or SLURM."""
    return subprocess.Popen(
        [sys.executable, "-m", "smi_cli", "invert", *TINY, "--iterations", "100000", "--batch-size", "2",
         "--schedule", "3:0.5", "--device", "cpu", "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "80"},
    )


def wait_for_iterations(out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "events.jsonl").exists() and sum(e["event"] == "iteration" for e in read_events(out)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} iterations in {out} after {timeout} s")


def test_a_killed_run_is_dead_everywhere_and_cannot_be_stopped(tmp_path):
    out = tmp_path / "run"
    proc = start_inversion(out)
    try:
        wait_for_iterations(out, 5)
        listed = json.loads(smi("runs", tmp_path, "--json", check=True).stdout)
        assert [(r["run"], r["status"]) for r in listed] == [(str(out), "running")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    (row,) = json.loads(smi("runs", tmp_path, "--json", check=True).stdout)
    assert row["status"] == "dead" and str(proc.pid) in row["reason"] and row["pid"] == proc.pid
    assert "dead" in smi("runs", tmp_path, check=True).stdout
    # smi watch --stop writes nothing into a dead run, and says how to continue it
    assert_one_line_error(smi("watch", out, "--stop"), "is dead", "smi invert --resume --out")
    assert not (out / "control.json").exists()

    async def steps(app, pilot):  # the dashboard, as `smi watch` opens it, following the run
        await pilot.pause(0.3)
        header = plain(app.query_one(RunHeader))
        assert "DEAD" in header and f"process {proc.pid}" in header
        problem = app.query_one(Problem)
        assert problem.display and f"smi invert --resume --out {out}" in plain(problem)  # how to go on
        assert "ETA" in plain(app.query_one(Throughput)) and "the run died" in plain(app.query_one(Throughput))
        await pilot.press("x")  # nothing to stop: no question, no control file
        assert not (out / "control.json").exists()

    async def main():
        async with Dashboard([out], ["invert"]).run_test(size=(140, 44)) as pilot:
            await steps(pilot.app, pilot)

    asyncio.run(main())


def test_a_run_without_events_for_long_is_stalled():
    state = RunState()
    for event in json.loads("[" + ",".join((RECORDED / "events.jsonl").read_text().splitlines()) + "]"):
        if event["event"] in ("batch_end", "run_end"):
            break
        state.apply(event)
    last = state.latest
    assert state.liveness(RECORDED, last + 1).status == "running"
    stalled = state.liveness(RECORDED, last + STALL_FLOOR_SECONDS + 6)
    assert stalled.status == "stalled" and stalled.reason == f"last event {STALL_FLOOR_SECONDS + 6:.0f} s ago"


def test_watch_stop_asks_a_live_run_which_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = start_inversion(out)
    try:
        wait_for_iterations(out, 3)
        assert "asked" in smi("watch", out, "--stop", check=True).stdout
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "smi invert --resume --out" in stderr
    (row,) = json.loads(smi("runs", out, "--json", check=True).stdout)
    assert row["status"] == "interrupted"
    assert_one_line_error(smi("watch", out, "--stop"), "is interrupted")


def test_piped_progress_arrives_while_the_job_runs(tmp_path):
    out = tmp_path / "run"
    proc = start_inversion(out, "--progress-every", "0.5")
    lines, during = [], []
    try:
        deadline = time.time() + 120
        while len(during) < 3 and time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("invert ") and proc.poll() is None:
                during.append(line)
        assert len(during) == 3, lines
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
    for line in during:  # whole plain lines: count, batch, images made, kept patches, losses, speed, elapsed and ETA
        assert re.match(r"invert \d+/100000 \(\d+%\) · batch 1/1 · images 0/2 · kept \d+/64 \(\d+%\) · loss [-\d.e+]+ .*· [\d.]+ it/s · "
                        r"elapsed \d:\d\d:\d\d · ETA \d+:\d\d:\d\d$", line.rstrip("\n")), line
    assert not ANSI.search("".join(lines) + rest) and "…" not in "".join(lines) + rest
    warning = next(line for line in lines if "random weights" in line)  # one line, never wrapped at 80 columns
    assert len(warning) > 80 and warning.startswith("warning:")


def test_the_terminal_bar_keeps_count_elapsed_and_eta_at_80_columns():
    console = Console(width=80, force_terminal=True, color_system=None, record=True, file=open(os.devnull, "w"))
    display = TerminalDisplay(console)
    task = display.add("invert", 12000)
    display.update(task, 345, "batch 2/3 · kept 44/64 (69%) · loss 2.184 (ce 2.17, tv_l2 0.0115) · 41.6 it/s", eta=125.0)
    line = _render(display)
    assert "345/12000" in line and "0:00:00" in line and "ETA 0:02:05" in line and "batch 2/3" in line


def _render(display: TerminalDisplay) -> str:
    console = display.progress.console
    with console.capture() as captured:
        console.print(display.progress.make_tasks_table(display.progress.tasks))
    return captured.get()


def test_eta_projects_the_schedule_cost_and_does_not_jump_at_a_batch_start():
    """Iterations timed exactly by the cost model: the ETA is the true remaining time all along."""
    from smi_engine.inversion.schedule import CostModel

    stops, kept, iterations, batches = [10, 20], [64, 32, 16], 40, 3
    model = CostModel.of(stops, kept, 1, 48, iterations)
    seconds = {i: model.cost(i, i + 1) / model.batch_cost for i in range(iterations)}  # a batch takes 1 s
    updates, clock = [], [0.0]
    display = SimpleNamespace(add=lambda label, total: SimpleNamespace(total=total),
                              update=lambda task, completed, info, eta: updates.append((clock[0], eta)))
    progress = InversionProgress(display)
    state = RunState()
    start = {"event": "run_start", "kind": "invert", "iterations": iterations, "pending_batches": list(range(batches)),
             "batches": batches, "num_patches": 64, "stops": [[10, 0.5], [20, 0.5]], "kept_per_stage": kept,
             "prefix_tokens": 1, "width": 48, "schedule": "10:0.5,20:0.5", "batch_size": 2, "grid": [8, 8],
             "time": 0.0, "rank": 0}
    events = [start]
    for batch in range(batches):
        events.append({"event": "batch_start", "batch": batch, "iterations": iterations, "num_patches": 64,
                       "stop_iterations": stops, "kept_per_stage": kept, "prefix_tokens": 1, "width": 48, "rank": 0})
        for i in range(iterations):
            k = kept[sum(i >= s for s in stops)]
            events.append({"event": "iteration", "batch": batch, "iteration": i, "kept": k, "tokens": k + 1,
                           "seconds": seconds[i], "images_per_s": 1.0, "tokens_per_s": 1.0, "losses": {"total": 1.0},
                           "rank": 0})
        events.append({"event": "batch_end", "batch": batch, "rank": 0})
    for event in events:
        if event["event"] == "iteration":
            clock[0] += event["seconds"]
            event["time"] = clock[0]
        progress(event)
        state.apply(event)
        if event["event"] == "iteration":  # the dashboard's ETA: what is left, exactly
            assert state.eta_seconds == pytest.approx(batches - clock[0], abs=1e-6)
    assert len(updates) == batches * iterations  # the progress line's ETA: the same
    assert all(eta == pytest.approx(batches - now, abs=1e-6) for now, eta in updates)


def test_log_display_writes_at_the_interval_and_when_done():
    written, now = [], [0.0]
    display = LogDisplay(written.append, every=10.0, clock=lambda: now[0])
    task = display.add("eval", 100)
    for step in range(1, 101):
        now[0] = step * 0.5
        display.update(task, step)
    assert [line.split(" ")[1] for line in written] == ["1/100", "21/100", "41/100", "61/100", "81/100", "100/100"]
    assert written[-1].endswith("ETA 0:00:00")


def test_runs_lists_every_kind_newest_first_with_headline_results(tmp_path, digits_teacher):
    teacher = tmp_path / "teacher"
    smi("teacher", "train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--model-args",
        "img_size=16,patch_size=4,depth=1,embed_dim=24,num_heads=2,in_chans=1", "--mean", "0.5", "--std", "0.5",
        "--epochs", "1", "--limit", "64", "--no-flip", "--out", teacher, "--device", "cpu", check=True)
    sparse = tmp_path / "demo" / "sparse"  # one level deeper, as smi demo lays runs out
    smi("invert", "--teacher", digits_teacher, "--iterations", "6", "--batch-size", "4", "--schedule", "2:0.5",
        "--device", "cpu", "--out", sparse, check=True)
    unfinished_copy(RECORDED, tmp_path / "old")
    (tmp_path / "not-a-run").mkdir()
    rows = json.loads(smi("runs", tmp_path, "--json", check=True).stdout)
    by_kind = {r["kind"]: r for r in rows}
    assert [r["run"] for r in rows][:2] == [str(sparse), str(teacher)]  # newest first
    assert by_kind["teacher"]["status"] == "finished" and 0 <= by_kind["teacher"]["result"]["top1"] <= 100
    invert = rows[0]
    assert invert["schedule"] == "2:0.5 (smi)" and invert["kept"] == "8/16" and invert["images"] == 4
    assert 0 <= invert["result"]["teacher_accuracy"] <= 100 and invert["active_seconds"] > 0
    old = next(r for r in rows if r["run"] == str(tmp_path / "old"))
    assert old["status"] == "stalled" and old["reason"].startswith("last event")  # recorded long ago, elsewhere
    table = smi("runs", tmp_path, check=True, env={"COLUMNS": "80"}).stdout  # piped: the whole table, never cut
    assert "teacher acc" in table and "finished" in table and "stalled" in table and "…" not in table
    for columns in (80, 60):  # a terminal too narrow for the table: a block of whole short lines per run
        shown = [line for line in _in_terminal(["runs", "."], columns, cwd=tmp_path).splitlines() if line.strip()]
        assert len(shown) == 3 * len(rows) and all(len(line) <= columns for line in shown), shown
        assert all(line.startswith("    ") == bool(i % 3) for i, line in enumerate(shown)), shown
    assert smi("runs", tmp_path, "--quiet", check=True).stdout.split() == [r["run"] for r in rows]
    assert_one_line_error(smi("runs", tmp_path / "nowhere"), "does not exist")


def test_help_completion_and_smi_runs_start_without_torch():
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('LOADED', [m for m in ('torch', 'timm', 'textual') if m in sys.modules], file=sys.stderr))\n"
             "from smi_cli.app import main\nmain()\n")
    for argv, env in ((["--help"], {}), (["--version"], {}), (["invert", "--help"], {}), (["runs", str(RECORDED)], {}),
                      ([], {"_SMI_COMPLETE": "complete_bash", "COMP_WORDS": "smi inv", "COMP_CWORD": "1"})):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                              env={**os.environ, **env})
        assert "LOADED []" in proc.stderr, (argv, proc.stderr)
        if env:
            assert proc.stdout.split() == ["invert"]


COMMANDS = (["invert"], ["quantize"], ["distill"], ["eval"], ["export"], ["runs"], ["watch"], ["task"], ["plugins"],
            ["bench"], ["demo"], ["teacher", "train"], ["data", "info"], ["data", "fetch"])


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_teaches_and_fits_80_columns(command):
    text = smi(*command, "--help", check=True, env={"COLUMNS": "80"}).stdout
    assert "Example" in text and f"smi {' '.join(command)}" in text.split("Example", 1)[1]
    assert "<bool>" not in text and "…" not in text and "{" not in text.splitlines()[0]
    assert max(len(line) for line in text.splitlines()) <= 80  # wrapped, examples included
    assert "--quiet" in text
    if "--json" in text:  # a flag everywhere: it takes no value
        assert re.search(r"--json\s{2,}Print", text), text


def test_usage_lines_name_arguments_plainly():
    assert smi("watch", "--help", check=True).stdout.startswith("Usage: smi watch [OPTIONS] RUNS...")
    assert smi("runs", "--help", check=True).stdout.startswith("Usage: smi runs [OPTIONS] [DIRS...]")


def test_plugins_table_never_cuts_a_name_when_piped():
    text = smi("plugins", check=True, env={"COLUMNS": "40"}).stdout
    assert "deepinversion" in text and "…" not in text


class RecordedNvml:
    """NVML as ``pynvml`` presents it, returning a reading recorded on an H100 mid-inversion."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.handles = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(uuid)
        return "handle"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87, memory=41)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=85_520_809_984, free=80_047_554_560, used=5_473_255_424)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 64


def test_nvml_reading_reaches_events_and_the_header():
    nvml = RecordedNvml()
    monitor = open_monitor("cuda", 0, "58e5ab2c-1f2e-4b7a-9f43-0c7ad1b3a9e1", nvml)
    reading = monitor.read()
    assert nvml.handles == ["GPU-58e5ab2c-1f2e-4b7a-9f43-0c7ad1b3a9e1"]
    assert reading == {"utilization": 87.0, "memory_used_mb": 5_473_255_424 / 2**20,
                       "memory_total_mb": 85_520_809_984 / 2**20, "temperature_c": 64.0}
    from smi_cli.dashboard.widgets import gpu_text

    assert gpu_text(reading) == "GPU 87% · 5.1/80 GB · 64°C"
    state = RunState()
    state.apply({"event": "iteration", "batch": 0, "iteration": 0, "kept": 1, "tokens": 2, "seconds": 0.1,
                 "images_per_s": 1.0, "tokens_per_s": 1.0, "losses": {"total": 1.0}, "gpu": reading, "time": 1.0})
    assert state.gpu == reading


def test_nvml_absent_or_without_a_driver_gives_no_reading():
    assert open_monitor("cpu", None, None) is None
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pynvml'] = None\n"
                              "from smi_engine.runtime.gpu import open_monitor\nprint(open_monitor('cuda', 0, 'x'))"],
                             capture_output=True, text=True, check=True)
    assert blocked.stdout.strip() == "None"
    pynvml = pytest.importorskip("pynvml")
    monitor = open_monitor("cuda", 0, None, pynvml)  # this machine's own NVML: no driver, or a real GPU
    if monitor is not None:
        reading = monitor.read()
        assert reading is None or 0 <= reading["utilization"] <= 100


def test_the_dashboard_fits_80_by_24():
    async def main():
        async with Dashboard([RECORDED], ["invert"], follow=False).run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            app = pilot.app
            throughput = app.query_one(Throughput)
            assert throughput.content_region.height >= 6  # every row, the ETA included, is on screen
            retention = app.query_one(PatchRetention)
            assert retention.border_subtitle == "3 of 4 images drawn"

    asyncio.run(main())


def test_tensorboard_sink_writes_losses_patches_and_previews(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    smi("invert", *TINY, "--iterations", "8", "--batch-size", "2", "--schedule", "3:0.5", "--device", "cpu",
        "--sink", "tensorboard", "--out", out, "--quiet", check=True)
    (events_file,) = (out / "tensorboard").iterdir()
    log = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    log.Reload()
    tags = log.Tags()
    assert {"loss/total", "loss/deepinversion.ce", "loss/deepinversion.tv_l2", "patches/kept",
            "throughput/images_per_s"} <= set(tags["scalars"])
    assert [e.value for e in log.Scalars("patches/kept")] == [64] * 3 + [32] * 5
    assert tags["images"] and events_file.name.startswith("events.out.tfevents")


def test_tensorboard_sink_options_thin_the_scalars_and_leave_out_previews(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    smi("invert", *TINY, "--iterations", "8", "--batch-size", "2", "--schedule", "3:0.5", "--device", "cpu",
        "--sink", "tensorboard", "--sink-option", "tensorboard.every=3", "--sink-option", "tensorboard.images=false",
        "--out", out, "--quiet", check=True)
    log = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    log.Reload()
    kept = log.Scalars("patches/kept")
    assert [e.step for e in kept] == [0, 3, 6] and [e.value for e in kept] == [64, 32, 32]
    assert not log.Tags()["images"]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["sink_options"] == {"tensorboard": {"every": 3, "images": False}}  # recorded as the values they are
    again = tmp_path / "again"
    smi("invert", "--config", out / "config.json", "--out", again, "--quiet", check=True)
    assert json.loads((again / "config.json").read_text())["config"]["sink_options"] == config["sink_options"]


def test_tensorboard_sink_follows_training_runs_too(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "teacher"
    smi("teacher", "train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--model-args",
        "img_size=16,patch_size=4,depth=1,embed_dim=24,num_heads=2,in_chans=1", "--mean", "0.5", "--std", "0.5",
        "--epochs", "2", "--limit", "64", "--batch-size", "32", "--no-flip", "--sink", "tensorboard", "--out", out,
        "--device", "cpu", "--quiet", check=True)
    log = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    log.Reload()
    assert [e.step for e in log.Scalars("train/loss")] == [1, 2, 3, 4]  # 2 epochs of 2 steps
    assert [e.step for e in log.Scalars("val/top1")] == [0, 1]
    assert_one_line_error(smi("teacher", "train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--sink", "nope",
                              "--out", tmp_path / "other", "--device", "cpu"), "unknown event sink 'nope'")
    assert not (tmp_path / "other").exists()


def test_tui_without_a_terminal_falls_back_to_plain_progress_and_exits(tmp_path):
    """Under nohup (output to a file, no input) --tui wrote escape codes into the log and never
    exited after the run; now one warning, plain progress lines, and the run ends as usual."""
    out, log = tmp_path / "run", tmp_path / "nohup.out"
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "smi_cli", "invert", *TINY, "--iterations", "6", "--batch-size", "2",
                               "--schedule", "3:0.5", "--device", "cpu", "--out", str(out), "--tui"],
                              stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\x1b" not in text and "--tui needs a terminal (input is not a terminal)" in text
    assert "invert 6/6 (100%)" in text and (out / "summary.json").is_file()
    watched = subprocess.run([sys.executable, "-m", "smi_cli", "watch", str(out)], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=60)
    assert_one_line_error(watched, "needs a terminal", "smi runs")


def test_a_pause_is_the_last_word_of_the_log_while_it_lasts(tmp_path):
    """`p` in --tui paused the loop but one more iteration event followed `paused`, so every
    reader (a second smi watch, smi runs) saw the run as running; now `paused` is told by the
    loop when it waits, after its last iteration."""
    import threading

    from smi_engine.runs.control import RunControl, RunInterrupted
    from smi_engine.inversion.config import InversionConfig
    from smi_engine.inversion.run import run_inversion
    from smi_engine.runs.rundir import RunDir

    from .conftest import tiny_spec

    out = tmp_path / "run"
    control = RunControl(RunDir(out))
    config = InversionConfig(model=tiny_spec(), schedule="3:0.5", iterations=100000, batch_size=2, checkpoint_every=0)
    failures = []

    def job():
        try:
            run_inversion(config, out, device="cpu", control=control)
        except RunInterrupted:
            pass
        except BaseException as exc:  # pragma: no cover - shown by the assertion below
            failures.append(exc)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(e["event"] == "iteration" for e in _events(out)):
            time.sleep(0.05)
        control.pause()
        time.sleep(1.0)
        events = read_events(out)
        assert events[-1]["event"] == "paused" and sum(e["event"] == "paused" for e in events) == 1
        assert json.loads(smi("runs", out, "--json", check=True).stdout)[0]["status"] == "paused"
        control.resume()
        while time.time() < deadline and "iteration" not in _after_pause(out):
            time.sleep(0.05)
        assert _after_pause(out)[0] == "unpaused" and "iteration" in _after_pause(out)  # it works on
    finally:
        control.request_stop()
        worker.join(timeout=120)
    assert not failures


def _events(out: Path) -> list[dict]:
    return read_events(out) if (out / "events.jsonl").exists() else []


def _after_pause(out: Path) -> list[str]:
    kinds = [e["event"] for e in read_events(out)]
    return kinds[kinds.index("paused") + 1:]


def test_one_definition_of_time_after_a_kill_and_a_resume(tmp_path):
    """A run killed, left dead for a while, then resumed: the summary, `smi runs`, the folded
    state and the printed summary agree on its active time, and its time since start holds
    the dead spell too (before: three different durations)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", *TINY, "--iterations", "300", "--batch-size", "2",
                             "--batches", "2", "--schedule", "3:0.5", "--device", "cpu", "--checkpoint-every", "0.2",
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_iterations(out, 20)
        time.sleep(0.5)  # a checkpoint lands
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    time.sleep(3.0)  # dead for a while
    resumed = smi("invert", "--resume", "--out", out, "--device", "cpu", check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["since_start_seconds"] - summary["active_seconds"] >= 2.5  # the dead spell is not active time
    assert summary["active_seconds"] >= summary["seconds"] * 0.5
    (row,) = json.loads(smi("runs", out, "--json", check=True).stdout)
    assert row["active_seconds"] == summary["active_seconds"]
    state = RunState()
    for event in read_events(out):
        state.apply(event)
    assert abs(state.clock.active - summary["active_seconds"]) < 1.0
    assert abs(state.clock.since_start - summary["since_start_seconds"]) < 1.0
    from smi_cli.progress import duration

    assert f"active {duration(summary['active_seconds'])}" in resumed.stdout


# -- 80 columns: every screen keeps what a user acts on -------------------------------------------
def _screen(runs: list[Path], size=(80, 24)) -> str:
    """What the dashboard draws on a terminal of ``size``, as text."""
    async def main():
        async with Dashboard(runs, ["invert"] * len(runs), follow=False).run_test(size=size) as pilot:
            await pilot.pause(0.3)
            return "\n".join(strip.text for strip in pilot.app.screen._compositor.render_strips(pilot.app.screen.size))

    return asyncio.run(main())


def test_an_interrupted_run_at_80_by_24_shows_its_whole_resume_command_and_every_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the command as the user typed the folder: a relative path
    run = unfinished_copy(RECORDED, Path("runs") / "a-run-folder-with-a-rather-long-name")
    last = read_events(run)[-1]["time"]
    with open(run / "events.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "run_interrupted", "time": last + 1, "rank": 0, "message": "stopped at batch 1"}) + "\n")
    screen = _screen([run])
    assert f"smi invert --resume --out {run}" in screen
    assert all(f"│ {row}" in screen for row in ("images ", "speed ", "active ", "ETA ")), screen
    throughput = [line for line in screen.splitlines() if re.match(r"│ (images|speed|active|token FLOPs|ETA) ", line)]
    assert throughput and not any("…" in line.split("││")[0] for line in throughput), throughput  # no value cut
    assert re.search(r"\d+/64 kept \(\d+%\) · batch \d+/\d+ ", screen), screen  # the retention headline, whole


def test_two_runs_at_80_columns_keep_the_verdict(tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(RECORDED, dense)
    text = (dense / "events.jsonl").read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in text]
    for event in events:
        if event["event"] == "iteration":
            event["seconds"] *= 2
    (dense / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    screen = _screen([dense, RECORDED])
    assert "recorded-sparse is 2.00x faster than dense" in screen.replace("\n", " ")


def _in_terminal(args: list[str], columns: int = 80, cwd: Path | None = None) -> str:
    """A command run on a pseudo-terminal ``columns`` wide, as the text it showed."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": str(columns)})
    os.close(slave)
    raw = b""
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        raw += chunk
    proc.wait(timeout=60)
    os.close(master)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace")).replace("\r", "")


def test_plugins_in_an_80_column_terminal_never_break_a_name():
    shown = _in_terminal(["plugins"])
    assert max(len(line) for line in shown.splitlines()) <= 80
    words = set(re.findall(r"[\w.-]+", shown))
    assert {"deepinversion", "quant_schemes", "tensorboard", "random", "repq", "quantize"} <= words, shown


@pytest.mark.parametrize("group", [[], ["data"], ["teacher"]])
def test_group_help_at_80_columns_cuts_no_command_summary(group):
    text = smi(*group, "--help", check=True, env={"COLUMNS": "80"}).stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not [line for line in text.splitlines()[1:] if line.rstrip().endswith("...")], text


@pytest.mark.parametrize("words, expected", [
    ("smi invert --selection ", ["pri", "random", "smi"]), ("smi invert --loss d", ["deepinversion"]),
    ("smi quantize --scheme ", ["matmul", "repq", "seed"]), ("smi invert --device c", ["cpu", "cuda"]),
    ("smi distill --selection p", ["pri"]), ("smi quantize --reconstruct ", ["none", "block"]),
])
def test_shell_completion_offers_the_values_an_option_takes(words, expected):
    proc = subprocess.run([sys.executable, "-m", "smi_cli"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "_SMI_COMPLETE": "complete_bash", "COMP_WORDS": words,
                               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))})
    assert proc.stdout.split() == expected, proc.stderr


def test_a_run_from_before_active_time_lists_its_recorded_time():
    """Summaries written before `active_seconds` existed keep the time they recorded in
    `smi runs`, rather than the few seconds a listing folds from the head of their log."""
    summary = json.loads((RECORDED / "summary.json").read_text())
    assert "active_seconds" not in summary
    (row,) = json.loads(smi("runs", RECORDED, "--json", check=True).stdout)
    assert row["active_seconds"] == summary["seconds"]
