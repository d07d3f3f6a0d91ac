"""``--config FILE``: options from TOML or from a run's own config.json, the command line
winning; a run's config.json makes the same run again (real subprocesses, real files)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from smi_engine.pool import load_pool

from .conftest import DIGITS_ARGS, TINY_MODEL_ARGS, assert_one_line_error, read_events, smi, tree_snapshot

DIGITS_MODEL_ARGS = ",".join(f"{k}={v}" for k, v in DIGITS_ARGS.items())
INVERT = ("invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5",
          "--iterations", "6", "--batch-size", "2", "--schedule", "3:0.5", "--device", "cpu", "--quiet")


def _config(run) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


def _same_pool(a, b) -> bool:
    """The same images, labels, masks and provenance (the shards' timings differ)."""
    first, again = load_pool(a), load_pool(b)
    return all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("images", "labels", "keep", "trajectory"))


def test_a_runs_config_json_makes_the_same_inversion_again(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert smi(*INVERT, "--selection", "pri", "--selection-option", "pri.keep_remaining=false", "--loss", "deepinversion",
               "--loss", "psaq:0.5", "--loss-option", "deepinversion.tv_l2=0.001", "--seed", "3", "--out", first).returncode == 0
    proc = smi("invert", "--config", first / "config.json", "--out", again, "--device", "cpu", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert _config(again) == _config(first)
    assert sorted(p.name for p in (again / "pool").iterdir()) == sorted(p.name for p in (first / "pool").iterdir())
    assert _same_pool(first, again)


def test_toml_options_are_defaults_the_command_line_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(
        'model = "vit_tiny_patch16_224"\n'
        "model-args = {img_size = 32, patch_size = 4, depth = 2, num_classes = 10, in_chans = 1, embed_dim = 48, num_heads = 3}\n"
        "mean = [0.5]\nstd = 0.5\niterations = 6\nbatch_size = 2\nschedule = \"3:0.5\"\n"
        'loss = ["deepinversion", "psaq:0.5"]\nflip = false\n')
    out = tmp_path / "run"
    assert smi("invert", "--config", tmp_path / "run.toml", "--iterations", "4", "--schedule", "2:0.5", "--out", out,
               "--device", "cpu", "--quiet").returncode == 0
    config = _config(out)
    assert config["iterations"] == 4 and config["schedule"] == "2:0.5"  # the command line wins
    assert config["batch_size"] == 2 and config["flip"] is False and config["model"]["mean"] == [0.5]
    assert config["model"]["args"]["embed_dim"] == 48 and [l["name"] for l in config["losses"]] == ["deepinversion", "psaq"]
    assert read_events(out)[-1]["event"] == "run_end"


def test_quantize_teacher_and_distill_runs_are_made_again_from_their_config(tmp_path):
    teacher = tmp_path / "teacher"
    train = ("teacher", "train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--model-args", DIGITS_MODEL_ARGS,
             "--mean", "0.5", "--std", "0.5", "--epochs", "1", "--batch-size", "64", "--limit", "256", "--no-flip",
             "--device", "cpu", "--quiet")
    assert smi(*train, "--out", teacher).returncode == 0
    assert smi("teacher", "train", "--config", teacher / "config.json", "--out", tmp_path / "teacher2", "--quiet").returncode == 0
    assert load_file(teacher / "model.safetensors").keys() == load_file(tmp_path / "teacher2" / "model.safetensors").keys()
    assert json.loads((teacher / "summary.json").read_text())["top1"] == json.loads(
        (tmp_path / "teacher2" / "summary.json").read_text())["top1"]

    pool = tmp_path / "pool"
    assert smi("invert", "--teacher", teacher, "--iterations", "6", "--batch-size", "8", "--schedule", "3:0.5",
               "--device", "cpu", "--out", pool, "--quiet").returncode == 0
    runs = {}
    for kind, args in (("quantize", ("quantize", "--teacher", teacher, "--calib", pool, "--calib-size", "8", "--w-bit", "4",
                                     "--a-bit", "4", "--data", "digits", "--limit", "128", "--device", "cpu")),
                       ("distill", ("distill", "--teacher", teacher, "--student", "vit_tiny_patch16_224", "--student-args",
                                    DIGITS_MODEL_ARGS, "--pool", pool, "--data", "digits", "--epochs", "2", "--limit", "128",
                                    "--device", "cpu"))):
        assert smi(*args, "--out", tmp_path / kind, "--quiet").returncode == 0
        proc = smi(kind, "--config", tmp_path / kind / "config.json", "--out", tmp_path / f"{kind}2", "--json")
        assert proc.returncode == 0, proc.stderr
        assert _config(tmp_path / f"{kind}2") == _config(tmp_path / kind)
        runs[kind] = (json.loads((tmp_path / kind / "summary.json").read_text()), json.loads(proc.stdout))
    assert runs["quantize"][0]["top1"] == runs["quantize"][1]["top1"]
    assert runs["distill"][0]["best_top1"] == runs["distill"][1]["best_top1"]


@pytest.mark.parametrize("text, name, message", [
    ("bogus = 1\n", "bad.toml", "sets 'bogus', which smi invert does not take from a file"),
    ("iterations = [\n", "broken.toml", "is not readable TOML"),
    ("quiet = true\n", "quiet.toml", "sets 'quiet'"),
    ('{"kind": "quantize", "config": {}}', "config.json", "configuration of a 'quantize' run, not of smi invert"),
    ("[1, 2]", "list.json", "holds no table of options"),
])
def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path, text, name, message):
    (tmp_path / name).write_text(text)
    before = tree_snapshot(tmp_path)
    assert_one_line_error(smi("invert", "--config", tmp_path / name, "--out", tmp_path / "run"), message)
    assert tree_snapshot(tmp_path) == before


def test_resume_takes_no_config_file(tmp_path):
    run = tmp_path / "run"
    assert smi(*INVERT, "--out", run).returncode == 0
    before = tree_snapshot(run)
    assert_one_line_error(smi("invert", "--resume", "--config", run / "config.json", "--out", run), "drop --config")
    assert tree_snapshot(run) == before
