"""A run folder is untrusted: links and special files in it are refused, never followed or
waited on, and nothing outside the run is written (real subprocesses, real links and FIFOs)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smi_cli.dashboard.follower import EventFollower
from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.run import run_inversion
from smi_engine.runs.rundir import RunDir

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, smi, tiny_spec, tree_snapshot

INVERT = ("invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5",
          "--iterations", "4", "--batch-size", "2", "--schedule", "2:0.5", "--device", "cpu", "--quiet")


@pytest.fixture
def outside(tmp_path):
    """Somebody else's file, which a link in a run folder points at."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


def _unfinished_run(out):
    """An inversion interrupted in its first batch: resumable."""
    control = RunControl(RunDir(out))

    def stop(event):
        if event["event"] == "iteration" and event["iteration"] == 1:
            control.request_stop()

    config = InversionConfig(model=tiny_spec(), schedule="2:0.5", iterations=4, batch_size=2, checkpoint_every=0)
    with pytest.raises(RunInterrupted):
        run_inversion(config, out, device="cpu", sinks=[stop], control=control)


@pytest.mark.parametrize("command", [INVERT, ("quantize", "--model", "vit_tiny_patch16_224", "--model-args",
                                              "img_size=16,patch_size=4,depth=1,in_chans=1,num_classes=10",
                                              "--mean", "0.5", "--std", "0.5", "--calib", "noise", "--data", "digits",
                                              "--calib-size", "2", "--limit", "8", "--device", "cpu", "--quiet")])
def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, outside, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(outside)
    proc = smi(*command, "--out", out, timeout=120)
    assert_one_line_error(proc, "is a symbolic link", "remove it")
    assert outside.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_lock_that_is_a_fifo_neither_hangs_a_run_nor_a_listing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / ".lock")
    proc = smi(*INVERT, "--out", out, timeout=120)  # before: blocked for ever opening the FIFO
    assert_one_line_error(proc, "is not a regular file")
    _unfinished_run(tmp_path / "other")
    os.unlink(tmp_path / "other" / ".lock")
    os.mkfifo(tmp_path / "other" / ".lock")
    listed = smi("runs", tmp_path / "other", "--json", timeout=120)
    assert listed.returncode == 0 and '"status"' in listed.stdout


@pytest.mark.parametrize("name", ["events.jsonl", ".lock"])
def test_a_resume_through_a_replaced_file_writes_nothing_anywhere(tmp_path, outside, name):
    out = tmp_path / "run"
    _unfinished_run(out)
    (out / name).unlink()
    (out / name).symlink_to(outside)
    before = _without_lock(tree_snapshot(out))
    proc = smi("invert", "--resume", "--out", out, "--device", "cpu", "--quiet", timeout=120)
    assert_one_line_error(proc, f"{name} is a symbolic link")
    assert outside.read_text() == "precious\n" and _without_lock(tree_snapshot(out)) == before


def _without_lock(tree):
    """The run's files but its lock, which names the last process that held it (the refusal's)."""
    return {name: data for name, data in tree.items() if name != ".lock"}


@pytest.mark.parametrize("name", ["pool", "previews"])
def test_pool_and_previews_that_are_links_receive_nothing(tmp_path, name):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    _unfinished_run(out)
    elsewhere.mkdir()
    for item in (out / name).iterdir():
        item.rename(elsewhere / item.name)
    (out / name).rmdir()
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.iterdir())
    proc = smi("invert", "--resume", "--out", out, "--device", "cpu", "--quiet", timeout=120)
    assert_one_line_error(proc, f"{name} is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == before


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_a_pool_that_is_a_link_is_not_read(tmp_path, command):
    """A run whose pool/ links to another run's pool (someone else's images, or a folder being
    written) is refused by every reader of pools, not calibrated or exported from."""
    other, run = tmp_path / "other", tmp_path / "run"
    assert smi(*INVERT, "--out", other, timeout=120).returncode == 0
    assert smi(*INVERT, "--out", run, timeout=120).returncode == 0
    for shard in (run / "pool").iterdir():
        shard.unlink()
    (run / "pool").rmdir()
    (run / "pool").symlink_to(other / "pool", target_is_directory=True)
    if command == "export":
        proc = smi("export", run, "--to", tmp_path / "images", timeout=120)
    else:
        proc = smi("quantize", *INVERT[1:9], "--calib", run, "--data", "digits", "--limit", "8", "--device", "cpu",
                   "--quiet", timeout=120)
    assert_one_line_error(proc, "pool is a symbolic link")
    assert not (tmp_path / "images").exists()


def test_the_event_follower_skips_a_log_that_is_a_fifo_or_a_link(tmp_path, outside):
    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)
    assert EventFollower(fifo, lambda events: None).read_new() == []  # at once: no writer is waited for
    link = tmp_path / "linked.jsonl"
    outside.write_text('{"event": "run_start", "time": 1}\n')
    link.symlink_to(outside)
    assert EventFollower(link, lambda events: None).read_new() == []


def test_the_dashboard_shows_only_the_runs_own_bounded_previews(tmp_path, outside):
    from PIL import Image

    from smi_engine.errors import SmiError
    from smi_engine.inversion.preview import read_preview

    previews = tmp_path / "previews"
    previews.mkdir()
    Image.new("RGB", (8, 4), (255, 0, 0)).save(previews / "batch-00000-it00004.png")
    assert read_preview(tmp_path, "previews/batch-00000-it00004.png").size == (8, 4)
    for named in ("../victim.txt", "/etc/passwd", "previews/../../victim.txt", 42, "previews/x.png"):
        with pytest.raises(SmiError, match="not one of the run's previews"):
            read_preview(tmp_path, named)
    os.mkfifo(previews / "batch-00000-it00008.png")
    with pytest.raises(SmiError, match="not a regular file"):  # at once, where Image.open would wait for a writer
        read_preview(tmp_path, "previews/batch-00000-it00008.png")
    (previews / "batch-00000-it00012.png").symlink_to(outside)
    with pytest.raises(SmiError, match="symbolic link"):
        read_preview(tmp_path, "previews/batch-00000-it00012.png")
    Image.new("1", (10000, 10000)).save(previews / "batch-00000-it00016.png")  # 100 M pixels in a few kB
    assert (previews / "batch-00000-it00016.png").stat().st_size < 200_000
    with pytest.raises(SmiError, match="too large to show"):
        read_preview(tmp_path, "previews/batch-00000-it00016.png")


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update(images=t["images"].half()), "images is torch.float16"),
    (lambda t: t["images"].__setitem__((0, 0, 0, 0), float("nan")), "images hold NaN or infinite values"),
    (lambda t: t.update(keep=torch.ones(len(t["keep"]), 5, 5, dtype=torch.bool)), "keep is a 5x5 grid"),
    (lambda t: t["keep"][0].zero_(), "keep leaves an image with no patch"),
    (lambda t: t.update(labels=t["labels"][:1]), "labels/keep count 1/2 for 2 images"),
    (lambda t: t.pop("labels"), "labels is missing"),
])
def test_a_damaged_pool_shard_is_named_before_it_is_used(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from smi_engine.errors import SmiError
    from smi_engine.pool import load_pool

    out = tmp_path / "run"
    assert smi(*INVERT, "--out", out).returncode == 0
    shard = next((out / "pool").glob("*.safetensors"))
    tensors = load_file(str(shard))
    damage(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard))
    with pytest.raises(SmiError, match=f"pool shard {shard}: {message}"):
        load_pool(out)
    proc = smi("quantize", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std",
               "0.5", "--calib", out, "--data", "digits", "--device", "cpu", "--limit", "4")
    assert_one_line_error(proc, message)


def _snapshot(out):
    return {name: data for name, data in tree_snapshot(out).items() if name != ".lock"}


@pytest.mark.parametrize("tamper, message", [
    (lambda out: (out / "config.json").write_text((out / "config.json").read_text().replace('"iterations": 4', '"iterations": 8')),
     "changed since its checkpoint was saved"),
    (lambda out: torch.save({"anything": torch.zeros(1)}, out / "checkpoint.pt"), "has no valid 'batch'"),
    (lambda out: torch.save({"batch": 0, "iteration": 1, "store": torch.zeros(5, 64, 16), "kept": torch.zeros(1),
                             "param": torch.zeros(1)}, out / "checkpoint.pt"), "holds images of shape (5, 64, 16)"),
])
def test_a_resume_refuses_a_run_changed_since_its_checkpoint_and_writes_nothing(tmp_path, tamper, message):
    out = tmp_path / "run"
    _unfinished_run(out)
    tamper(out)
    before = _snapshot(out)
    proc = smi("invert", "--resume", "--out", out, "--device", "cpu", "--quiet", timeout=120)
    assert_one_line_error(proc, message)
    assert _snapshot(out) == before  # no run_resumed, no run_error: a refused resume writes nothing


def test_a_run_records_its_teachers_weights_by_absolute_path_and_digest(tmp_path, digits_teacher):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", "--teacher", "teacher", "--iterations", "100000",
                             "--batch-size", "2", "--device", "cpu", "--out", "run", "--quiet", "--checkpoint-every", "0"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "events.jsonl").exists() and b'"iteration"' in (out / "events.jsonl").read_bytes()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["model"]["checkpoint"] == str((teacher / "model.safetensors").resolve())  # not relative to the cwd
    assert len(config["teacher_sha256"]) == 64
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(teacher / "model.safetensors"))  # retrained in place
    before = _snapshot(out)
    assert_one_line_error(smi("invert", "--resume", "--out", out, "--device", "cpu"), "teacher's weights",
                          "changed since", "start a new run")
    assert _snapshot(out) == before


def test_a_resume_from_another_folder_uses_the_runs_own_teacher(tmp_path, digits_teacher):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(digits_teacher, first / "teacher")
    shutil.copytree(digits_teacher, second / "teacher")  # another teacher/ where the resume runs
    weights = load_file(str(second / "teacher" / "model.safetensors"))
    save_file({k: v * 0 for k, v in weights.items()}, str(second / "teacher" / "model.safetensors"))
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", "--teacher", "teacher", "--iterations", "60",
                             "--lr", "0.1", "--jitter", "0", "--no-flip",  # this teacher never saw shifted digits
                             "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
                             "--checkpoint-every", "0"], cwd=first, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and b'"iteration"' in events.read_bytes()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.communicate(timeout=120) and proc.returncode == 130
    resumed = subprocess.run([sys.executable, "-m", "smi_cli", "invert", "--resume", "--out", str(tmp_path / "run"),
                              "--device", "cpu", "--json"], cwd=second, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["teacher_accuracy"] > 0.5  # the trained teacher of folder a, not b's zeroed weights
