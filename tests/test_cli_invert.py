"""``smi`` as users run it: real subprocesses, real files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from .conftest import TINY_ARGS, TINY_MODEL_ARGS, assert_one_line_error, read_events, smi, tree_snapshot

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")
QUICK = ("--iterations", "10", "--batch-size", "2", "--device", "cpu")


def test_help_lists_every_command():
    proc = smi("--help", check=True)
    for command in ("invert", "quantize", "distill", "teacher", "eval", "export", "watch", "plugins", "bench", "demo"):
        assert command in proc.stdout
    assert smi("--version", check=True).stdout.startswith("smi ")


def test_invert_end_to_end_with_json_summary(tmp_path):
    out = tmp_path / "run"
    proc = smi("invert", *TINY, *QUICK, "--schedule", "3:0.5", "--batches", "2", "--out", out, "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["images"] == 4 and summary["kept_patches"] == 32 and summary["run_dir"] == str(out)
    assert len([e for e in read_events(out) if e["event"] == "iteration"]) == 20
    assert sorted(p.name for p in (out / "pool").iterdir()) == ["batch-00000-r0.safetensors", "batch-00001-r0.safetensors"]


def test_human_output_and_default_run_directory(tmp_path):
    proc = smi("invert", *TINY, *QUICK, "--schedule", "dense", cwd=tmp_path, check=True)
    assert "teacher accuracy" in proc.stdout and "done" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith("-vit_tiny_patch16_224-dense") and (run / "summary.json").is_file()


def test_checkpoint_file_and_loss_options(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS)
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "run"
    smi("invert", *TINY, *QUICK, "--checkpoint", checkpoint, "--loss", "deepinversion:2",
        "--loss-option", "deepinversion.tv_l1=0.01", "--loss-option", "deepinversion.l2=0.001", "--out", out, check=True)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["model"]["checkpoint"] == str(checkpoint)
    assert config["losses"] == [{"name": "deepinversion", "weight": 2.0, "options": {"tv_l1": 0.01, "l2": 0.001}}]
    losses = json.loads((out / "summary.json").read_text())["final_losses"]
    assert set(losses) == {"total", "deepinversion.ce", "deepinversion.tv_l2", "deepinversion.tv_l1", "deepinversion.l2"}


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (("--schedule", "3:1.5"), ("outside (0, 1)",)),
        (("--schedule", "6:0.3,3:0.3"), ("must increase",)),
        (("--schedule", "30:0.3"), ("past --iterations",)),
        (("--loss", "dreaming"), ("unknown loss 'dreaming'", "smi plugins")),
        (("--loss-option", "deepinversion.colour=3"), ("no option 'colour'",)),
        (("--iterations", "0"), ("--iterations 0 must be at least 1",)),
        (("--device", "tpu"), ("--device",)),
        (("--targets", "3,99"), ("outside 0..9",)),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, extra, fragments):
    proc = smi("invert", *TINY, *QUICK, *extra, "--out", tmp_path / "run")
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


def test_unknown_model_suggests_names(tmp_path):
    proc = smi("invert", "--model", "vit_tiny_patch16_244", *QUICK, "--out", tmp_path / "run")
    assert_one_line_error(proc, "unknown model", "did you mean vit_tiny_patch16_224")


def test_non_vit_and_classless_models_are_refused(tmp_path):
    proc = smi("invert", "--model", "resnet18", "--model-args", "num_classes=10", *QUICK, "--out", tmp_path / "a")
    assert_one_line_error(proc, "not a timm vision transformer")
    proc = smi("invert", *TINY[:2], "--model-args", TINY_MODEL_ARGS + ",class_token=False,global_pool=avg",
               *QUICK, "--schedule", "3:0.3", "--out", tmp_path / "b")
    assert_one_line_error(proc, "no class token", "--schedule dense")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_checkpoints(tmp_path):
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(smi("invert", *TINY, *QUICK, "--checkpoint", corrupt, "--out", tmp_path / "a"), "cannot read checkpoint")
    other = timm.create_model("vit_tiny_patch16_224", **{**TINY_ARGS, "num_classes": 100})
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    assert_one_line_error(smi("invert", *TINY, *QUICK, "--checkpoint", wrong, "--out", tmp_path / "b"), "does not fit", "head.weight")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_existing_run_directory_is_refused_and_unchanged(tmp_path):
    out = tmp_path / "run"
    smi("invert", *TINY, *QUICK, "--out", out, check=True)
    before = tree_snapshot(out)
    assert_one_line_error(smi("invert", *TINY, *QUICK, "--out", out), "finished run", "another --out")
    assert_one_line_error(smi("invert", "--resume", "--out", out), "already finished")
    assert_one_line_error(smi("invert", "--resume", "--iterations", "5", "--out", out), "drop --iterations")
    assert tree_snapshot(out) == before


@pytest.mark.slow
def test_ctrl_c_leaves_a_run_that_resume_finishes_identically(tmp_path):
    args = (*TINY, "--iterations", "300", "--batch-size", "2", "--batches", "2", "--schedule", "20:0.3,60:0.3",
            "--device", "cpu", "--checkpoint-every", "0")
    reference = tmp_path / "reference"
    smi("invert", *args, "--out", reference, "--quiet", check=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", *map(str, args), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is inside the first batch
        events = read_events(out) if (out / "events.jsonl").exists() else []
        if sum(e["event"] == "iteration" for e in events) > 80:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "smi invert --resume --out" in stderr
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()
    smi("invert", "--resume", "--out", out, "--quiet", check=True)
    for name in ("batch-00000-r0.safetensors", "batch-00001-r0.safetensors"):
        a, b = load_file(str(reference / "pool" / name)), load_file(str(out / "pool" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    kinds = [e["event"] for e in read_events(out)]
    assert "run_interrupted" in kinds and "batch_resumed" in kinds and kinds[-1] == "run_end"
