"""Data-free knowledge transfer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from smi_engine.data import ModelInput, load_data, loader
from smi_engine.distill import DistillConfig, kd_loss, prepare_student, run_distillation
from smi_engine.errors import SmiError
from smi_engine.files import write_json
from smi_engine.invert import InversionConfig
from smi_engine.models import ModelSpec, load_model
from smi_engine.pool import write_shard

from .conftest import DIGITS_ARGS, read_events, smi

STUDENT = ModelSpec("vit_tiny_patch16_224", {**DIGITS_ARGS, "depth": 1}, mean=(0.5,), std=(0.5,))


def test_kd_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-7)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # teacher at T=1: (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_loss(s, t, 1.0)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(s, t * 2, 2.0)) == pytest.approx(4 * expected, rel=1e-6)  # T^2 scaling


@pytest.fixture(scope="module")
def real_pool(tmp_path_factory, digits_teacher):
    """Real digits stored as a pool, to see the transfer learn (synthetic data needs hours)."""
    folder = tmp_path_factory.mktemp("real-pool")
    teacher = ModelSpec.from_dir(digits_teacher)
    write_json(folder / "config.json", {"kind": "invert", "config": {"model": teacher.to_dict()}})
    (folder / "events.jsonl").touch()
    loaded = load_model(teacher)
    images, labels = next(iter(loader(load_data("digits").train, ModelInput.for_model(loaded.model, loaded.normalizer), 2000)))
    write_shard(folder / "pool", 0, 0, images, labels, torch.ones(len(images), 4, 4, dtype=torch.bool), {})
    return folder


def test_transfer_teaches_the_student_and_keeps_the_best(tmp_path, digits_teacher, real_pool):
    config = DistillConfig(ModelSpec.from_dir(digits_teacher), STUDENT, "digits", pools=[str(real_pool)], epochs=4,
                           batch_size=64, lr=3e-3, temperature=4.0)
    summary = run_distillation(config, tmp_path / "kt", torch.device("cpu"))
    history = summary["history"]
    assert summary["best_top1"] > 40 and summary["best_top1"] == max(h["val_top1"] for h in history)
    assert history[-1]["kt_loss"] < history[0]["kt_loss"]
    best = load_model(ModelSpec.from_dir(tmp_path / "kt" / "student"))
    card = json.loads((tmp_path / "kt" / "student" / "smi-model.json").read_text())
    assert card["accuracy"]["top1"] == summary["best_top1"] and best.num_classes == 10
    epochs = [e for e in read_events(tmp_path / "kt") if e["event"] == "epoch_end"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3] and all({"kt_loss", "val_top1"} <= set(e) for e in epochs)


def test_synthesize_inverts_fresh_batches_every_epoch(tmp_path, digits_teacher):
    teacher = ModelSpec.from_dir(digits_teacher)
    synth = InversionConfig(model=teacher, schedule="3:0.5", iterations=6, batch_size=8, flip=False)
    config = DistillConfig(teacher, STUDENT, "digits", synthesize=synth, synth_batches=2, epochs=2, batch_size=8, limit=64)
    summary = run_distillation(config, tmp_path / "kt", torch.device("cpu"))
    assert summary["synthetic_images"] == 32
    assert len(list((tmp_path / "kt" / "pool").iterdir())) == 4
    kinds = [e["event"] for e in read_events(tmp_path / "kt")]
    assert kinds.count("batch_start") == 4 and kinds.count("stop") == 4 and kinds.count("epoch_end") == 2
    assert kinds[-1] == "run_end"


def test_linear_probe_trains_only_the_head(digits_teacher):
    student = prepare_student(ModelSpec.from_dir(digits_teacher), 10, linear_probe=True, device=torch.device("cpu"))
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_bad_requests(tmp_path, digits_teacher):
    teacher = ModelSpec.from_dir(digits_teacher)
    with pytest.raises(SmiError, match="--pool RUN_DIR"):
        run_distillation(DistillConfig(teacher, STUDENT, "digits"), tmp_path / "a", torch.device("cpu"))
    with pytest.raises(SmiError, match="student has 3 classes but the teacher 10"):
        prepare_student(ModelSpec("vit_tiny_patch16_224", {**DIGITS_ARGS, "num_classes": 3}), 10, False, torch.device("cpu"))
    assert not (tmp_path / "a").exists()


def test_distill_cli(tmp_path, digits_teacher, real_pool):
    proc = smi("distill", "--teacher", digits_teacher, "--student", "vit_tiny_patch16_224", "--student-args",
               "img_size=16,patch_size=4,depth=1,in_chans=1,embed_dim=48,num_heads=3", "--pool", real_pool,
               "--data", "digits", "--epochs", "1", "--limit", "100", "--out", tmp_path / "kt", "--json", "--device", "cpu", check=True)
    summary = json.loads(proc.stdout)
    assert summary["epochs"] == 1 and summary["student_dir"] == str(tmp_path / "kt" / "student")
    assert (tmp_path / "kt" / "summary.json").is_file()
    missing = smi("distill", "--teacher", digits_teacher, "--student", "vit_tiny_patch16_224", "--data", "digits",
                  "--out", tmp_path / "none")
    assert missing.returncode == 2 and "--pool RUN_DIR" in missing.stderr and not (tmp_path / "none").exists()
