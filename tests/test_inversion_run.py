"""Run directories: what a run leaves, resuming exactly, refusing to overwrite."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from smi_engine.runs.control import RunControl, RunInterrupted
from smi_engine.errors import SmiError
from smi_engine.files import atomic_path, write_json
from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.run import run_inversion
from smi_engine.inversion.losses import LossSpec
from smi_engine.pool import load_pool, shard_name
from smi_engine.vit.patches import blank_stopped
from smi_engine.runs.rundir import RunDir
from smi_engine.inversion.selection import SelectionSpec

from .conftest import read_events, tiny_spec, tree_snapshot


def _config(**overrides) -> InversionConfig:
    # No checkpoint: the random weights are reproducible (seeded), which resuming relies on.
    return InversionConfig(**{"model": tiny_spec(), "schedule": "4:0.3,8:0.5", "iterations": 12, "batch_size": 3,
                              "batches": 2, "checkpoint_every": 0, **overrides})


def test_a_run_leaves_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    summary = run_inversion(_config(), out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "invert" and config["config"]["schedule"] == "4:0.3,8:0.5"
    assert InversionConfig.from_dict(config["config"]) == _config()  # enough to re-run
    events = read_events(out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    iterations = [e for e in events if e["event"] == "iteration"]
    assert len(iterations) == 2 * 12
    for event in iterations:
        assert {"batch", "iteration", "losses", "kept", "images_per_s", "tokens_per_s"} <= set(event)
        assert set(event["losses"]) == {"total", "deepinversion.ce", "deepinversion.tv_l2"}
    stops = [e for e in events if e["event"] == "stop"]
    assert [(e["batch"], e["iteration"], e["kept"]) for e in stops] == [(0, 4, 44), (0, 8, 22), (1, 4, 44), (1, 8, 22)]
    assert all(len(e["kept_indices"]) == 3 and len(e["kept_indices"][0]) == e["kept"] for e in stops)
    for batch in (0, 1):
        shard = load_file(str(out / "pool" / shard_name(batch, 0)))
        assert shard["images"].shape == (3, 1, 32, 32) and shard["images"].dtype == torch.float32
        assert shard["labels"].dtype == torch.int64 and shard["keep"].dtype == torch.bool
        assert shard["keep"].shape == (3, 8, 8) and shard["keep"].sum((1, 2)).tolist() == [22, 22, 22]
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert "batch-00001-it00012.png" in previews and "batch-00000-it00004.png" in previews
    with Image.open(out / "previews" / "batch-00000-it00012.png") as image:
        assert image.mode == "RGB" and image.width > 96
    stored = json.loads((out / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    assert stored["images"] == 6 and stored["kept_patches"] == 22 and 0 <= stored["teacher_accuracy"] <= 1
    assert stored["stages"][0]["iterations"] == 8 and stored["stages"][2]["iterations"] == 8
    assert not (out / "checkpoint.pt").exists()


def test_pool_reads_back_with_labels_balanced_and_masks(tmp_path):
    run_inversion(_config(batches=2, batch_size=5), tmp_path / "run", device="cpu")
    pool = load_pool(tmp_path / "run")
    assert len(pool) == 10 and pool.labels.tolist() == list(range(10))
    assert pool.kept_fraction == pytest.approx(22 / 64)
    blanked = blank_stopped(pool.images, pool.keep)
    stopped = ~pool.keep[0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.all(blanked[0, 0][stopped] == 0) and torch.equal(blanked[0, 0][~stopped], pool.images[0, 0][~stopped])


class _StopAfter:
    """Asks the run to stop once it has seen a given (batch, iteration)."""

    def __init__(self, control: RunControl, batch: int, iteration: int):
        self.control, self.at = control, (batch, iteration)

    def __call__(self, event):
        if event["event"] == "iteration" and (event["batch"], event["iteration"]) == self.at:
            self.control.request_stop()


@pytest.mark.parametrize("stop_at, selection, options, schedule, images", [
    ((0, 6), "smi", {}, "4:0.3,8:0.5", 6), ((1, 2), "smi", {}, "4:0.3,8:0.5", 6),
    ((0, 9), "pri", {}, "4:0.3,8:0.5", 18),  # interrupted after two emissions, mid-trajectory
    ((0, 9), "pri", {"leaving": "freeze"}, "4:0.3,8:0.5", 6), ((0, 6), "random", {}, "every:3", 18),
])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, stop_at, selection, options, schedule, images):
    """Resume restores every piece of state, including what a policy decided (the images pri
    emitted before the interruption, the patches it froze; random draws from the batch's stream)."""
    config = _config(selection=SelectionSpec(selection, options), schedule=schedule)
    reference = tmp_path / "reference"
    run_inversion(config, reference, device="cpu")
    out = tmp_path / "interrupted"
    control = RunControl(RunDir(out))
    with pytest.raises(RunInterrupted):
        run_inversion(config, out, device="cpu", sinks=[_StopAfter(control, *stop_at)], control=control)
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()
    assert read_events(out)[-1]["event"] == "run_interrupted"
    run_inversion(None, out, resume=True, device="cpu")
    for batch in (0, 1):
        a = load_file(str(reference / "pool" / shard_name(batch, 0)))
        b = load_file(str(out / "pool" / shard_name(batch, 0)))
        assert set(a) == set(b) == {"images", "labels", "keep", "trajectory", "emitted_at"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["trajectory"].tolist() == [3 * batch + i for i in range(3)] * (images // 6)
    assert not (out / "checkpoint.pt").exists()
    assert json.loads((out / "summary.json").read_text())["images"] == images


def test_control_file_stops_a_run(tmp_path):
    out = tmp_path / "run"
    run_dir = RunDir(out)

    def request_stop(event):
        if event["event"] == "iteration" and event["iteration"] == 2:
            run_dir.request("stop")

    with pytest.raises(RunInterrupted):
        run_inversion(_config(batches=1), out, device="cpu", sinks=[request_stop], control=RunControl(run_dir))
    assert run_dir.checkpoint().is_file() and run_dir.pending_request() == "stop"
    run_inversion(None, out, resume=True, device="cpu")  # resuming clears the old request
    assert not run_dir.control.exists() and run_dir.is_finished


def test_finished_and_unfinished_runs_are_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_inversion(_config(batches=1), out, device="cpu")
    before = tree_snapshot(out)
    with pytest.raises(SmiError, match="finished run"):
        run_inversion(_config(batches=1), out, device="cpu")
    with pytest.raises(SmiError, match="already finished"):
        run_inversion(None, out, resume=True, device="cpu")
    assert tree_snapshot(out) == before
    (out / "summary.json").unlink()
    with pytest.raises(SmiError, match="unfinished run: pass --resume"):
        run_inversion(_config(batches=1), out, device="cpu")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(SmiError, match="not a run"):
        run_inversion(_config(batches=1), other, device="cpu")
    assert (other / "todo.txt").read_text() == "mine"


def test_bad_requests_touch_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SmiError, match="past --iterations"):
        run_inversion(_config(schedule="40:0.3"), out, device="cpu")
    with pytest.raises(SmiError, match="unknown loss"):
        run_inversion(_config(losses=[LossSpec("nope")]), out, device="cpu")
    assert not out.exists()


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path):
    target = tmp_path / "config.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
