"""The Python API (``import smi``): README's "From Python" blocks run as written, and the API
does what the command line does, on the same objects."""

import json
import re

import pytest
import timm
import torch

import smi

from .conftest import DIGITS_ARGS, ROOT, smi as run_cli

README = ROOT / "README.md"


def _python_blocks(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_from_python_section_runs_as_written(tmp_path, monkeypatch):
    blocks = _python_blocks("From Python")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "sparse" / "summary.json").is_file() and (tmp_path / "teacher" / "smi-model.json").is_file()


@pytest.fixture
def tiny_teacher():
    return timm.create_model("vit_tiny_patch16_224", **DIGITS_ARGS)


def test_inverting_in_memory_equals_the_run_directory_and_leaves_the_module_as_it_was(tmp_path, tiny_teacher):
    tiny_teacher.train()
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    kwargs = dict(schedule="3:0.5", iterations=6, batch_size=3, batches=2, selection="pri", seed=5, progress=False)
    in_memory = smi.invert(tiny_teacher, mean=[0.5], std=[0.5], **kwargs)
    assert tiny_teacher.training and all(p.requires_grad for p in tiny_teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny_teacher.state_dict().items())
    smi.save_model(tiny_teacher, tmp_path / "teacher", args=DIGITS_ARGS, mean=[0.5], std=[0.5])
    on_disk = smi.invert(tmp_path / "teacher", out=tmp_path / "run", **kwargs)
    for field in ("images", "labels", "keep", "trajectory", "emitted_at"):
        assert torch.equal(getattr(in_memory, field), getattr(on_disk, field)), field
    assert len(in_memory) == 2 * 3 * 2  # Patch Rebirth: one image per stop and a final one, per trajectory
    listed = json.loads(run_cli("runs", tmp_path / "run", "--json", check=True).stdout)
    assert listed[0]["status"] == "finished" and listed[0]["images"] == len(on_disk)


def test_quantize_from_python_matches_the_command_line(tmp_path, digits_teacher):
    """The same pool, seed and scheme: the API's quantised model scores what `smi quantize` reports."""
    run = tmp_path / "pool"
    assert run_cli("invert", "--teacher", digits_teacher, "--schedule", "4:0.5", "--iterations", "8",
                   "--batch-size", "8", "--device", "cpu", "--out", run, "--quiet").returncode == 0
    cli = json.loads(run_cli("quantize", "--teacher", digits_teacher, "--calib", run, "--calib-size", "8",
                             "--w-bit", "4", "--a-bit", "4", "--scheme", "repq", "--data", "digits", "--limit", "200",
                             "--device", "cpu", "--json", check=True).stdout)
    teacher = smi.load_model(digits_teacher)
    quantized = smi.quantize(teacher, smi.load_pool(run), scheme="repq", w_bit=4, a_bit=4, calib_size=8,
                             progress=False)
    accuracy = smi.evaluate(quantized, "digits", limit=200, progress=False)
    assert accuracy.top1 == pytest.approx(cli["top1"]) and accuracy.images == cli["eval_images"]
    assert smi.evaluate(teacher, "digits", limit=200, progress=False).top1 == pytest.approx(cli["fp32_top1"])
    smi.save_model(quantized, tmp_path / "q")  # knows what rebuilds it: the teacher folder's spec
    assert smi.evaluate(tmp_path / "q", "digits", limit=200, progress=False).top1 == pytest.approx(cli["top1"])


def test_progress_without_a_terminal_is_plain_lines(capfd, tiny_teacher):
    smi.invert(tiny_teacher, mean=[0.5], std=[0.5], iterations=3, batch_size=2)
    err = capfd.readouterr().err
    assert "invert 3/3 (100%)" in err and "\x1b" not in err


@pytest.mark.parametrize("call, message", [
    (lambda t, p: smi.invert(t, mean=[0.5], std=[0.5], iterations=2, learning_rate=1), "no setting 'learning_rate'"),
    (lambda t, p: smi.invert(t, mean=[0.5], std=[0.5], iterations=2, out=p / "run"), "smi.save_model"),
    (lambda t, p: smi.invert(t, mean=[0.5], std=[0.5], iterations=0), "--iterations"),
    (lambda t, p: smi.invert(t, device="cuda"), "move it first"),
    (lambda t, p: smi.save_model(t, p / "m"), "pass args="),
    (lambda t, p: smi.quantize(t, "nowhere", mean=[0.5], std=[0.5]), "neither noise"),
    (lambda t, p: smi.evaluate(t, "fashion-mnist-nope"), "fashion-mnist-nope"),
    (lambda t, p: smi.invert("not-a-folder"), "not a model folder"),
])
def test_bad_calls_are_one_line_errors_and_write_nothing(tmp_path, tiny_teacher, call, message):
    with pytest.raises(smi.SmiError) as caught:
        call(tiny_teacher, tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
