"""Shared fixtures: tiny real timm ViTs, the CLI as a real subprocess, paths to real data."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from smi_engine.inversion.config import InversionConfig
from smi_engine.inversion.loop import Inverter
from smi_engine.inversion.losses import build_losses
from smi_engine.models import LoadedModel, ModelSpec, load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# The unit-test ViT: 32x32 grey images, 4x4 patches (an 8x8 grid), two blocks.
TINY_ARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10, "in_chans": 1, "embed_dim": 48, "num_heads": 3}
TINY_MODEL_ARGS = ",".join(f"{k}={v}" for k, v in TINY_ARGS.items())


def tiny_spec(**overrides) -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", {**TINY_ARGS, **overrides}, mean=(0.5,), std=(0.5,))


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(tiny_spec())


def make_inverter(loaded: LoadedModel, bus=None, run_dir=None, control=None, **config) -> Inverter:
    cfg = InversionConfig(model=loaded.spec, **{"iterations": 12, "batch_size": 4, "checkpoint_every": 0, **config})
    return Inverter(cfg, loaded, build_losses(cfg.losses), torch.device("cpu"), bus, run_dir, control)


def step_through_stop(inverter: Inverter, stop_iteration: int):
    """Run batch 0 up to the stop at ``stop_iteration`` and through it. Returns the run, and from
    just before the stop: the optimised cells, their patches and their CLS-attention scores."""
    run = inverter.start_batch(0)
    while run.state.iteration < stop_iteration:
        run.step()
    before, patches = run.state.image.kept.clone(), run.state.image.param.detach().clone()
    with torch.no_grad():
        scores = inverter.vit.cls_attention(patches, before)
    run.step()
    return run, before, patches, scores


def tiny_model(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10, "embed_dim": 48, "num_heads": 3, **kwargs}
    return timm.create_model(name, **args).eval()


def smi(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = False):
    """Run the real ``smi`` CLI in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "smi_cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"smi {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *fragments: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def read_events(run_dir: Path) -> list[dict]:
    """A run's complete event lines; a damaged one fails the test. A reader can catch a line
    half-written (one write() is not atomic against a concurrent read), so the unterminated
    tail of a run in progress is left for the next read, as the engine's own readers do."""
    *complete, _tail = (run_dir / "events.jsonl").read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


DIGITS_ARGS = {"img_size": 16, "patch_size": 4, "depth": 2, "num_classes": 10, "in_chans": 1, "embed_dim": 48, "num_heads": 3}


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A real teacher: a tiny ViT trained on scikit-learn's digits (about 90% top-1, ~15 s),
    saved as a model folder, once per test session."""
    from smi_engine.data import load_data
    from smi_engine.models import save_model
    from smi_engine.downstream.teacher import TrainConfig, train_classifier

    torch.manual_seed(0)
    spec = ModelSpec("vit_tiny_patch16_224", DIGITS_ARGS, mean=(0.5,), std=(0.5,), classes=tuple("0123456789"))
    loaded = load_model(spec, frozen=False)
    config = TrainConfig(epochs=10, batch_size=32, lr=3e-3, weight_decay=0.0, label_smoothing=0.0, flip=False, shift=0.0, warmup_epochs=0.5)
    metrics = train_classifier(loaded, load_data("digits"), config, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("digits-teacher")
    save_model(folder, loaded, {"data": "digits", "accuracy": {"top1": metrics["top1"], "top5": metrics["top5"]}})
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A real trained-shape state_dict of the tiny ViT, saved with torch.save."""
    model = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def control_characters(text: str) -> list[str]:
    """Characters in ``text`` that a terminal would act on rather than show (newlines aside)."""
    return [c for c in text if not c.isprintable() and c not in "\n"]


def hostile_value(rng: random.Random, depth: int = 0):
    """A random value of the kinds that broke readers: NaN and huge numbers, wrong types, and
    text with escapes, markup, bidi overrides and newlines, nested up to three levels."""
    choices = [lambda: rng.choice([float("nan"), float("inf"), -1, 0, 2**40, 1e308, True, None]),
               lambda: "".join(rng.choice(["\x1b", "[", "]", "/", "a", "\x07", "\u202e", "\n", "é", "[red]"])
                               for _ in range(rng.randint(0, 12)))]
    if depth < 3:
        choices += [lambda: [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
                    lambda: {str(hostile_value(rng, 3)): hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}]
    return rng.choice(choices)()
