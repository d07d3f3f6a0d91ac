"""Two ranks under torchrun, on CPU with gloo: the same results as one process, resumable,
and a dead rank fails the job without spoiling what was written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from smi_engine.pool import load_pool, shard_batches
from smi_engine.runs.rundir import RunDir

from .conftest import TINY_MODEL_ARGS, read_events, smi

INVERT = ("invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5",
          "--batch-size", "2", "--batches", "3", "--schedule", "3:0.5,6:0.5", "--device", "cpu", "--checkpoint-every", "0")


def torchrun(*args, ranks: int = 2, wait: bool = True, timeout: float = 600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "smi_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _pools_equal(a, b) -> None:
    shards_a, shards_b = shard_batches(a / "pool"), shard_batches(b / "pool")
    assert sorted(shards_a) == sorted(shards_b)
    for batch in shards_a:
        x, y = load_file(str(shards_a[batch])), load_file(str(shards_b[batch]))
        assert all(torch.equal(x[k], y[k]) for k in ("images", "labels", "keep")), batch


def test_two_ranks_give_the_single_process_result(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    smi(*INVERT, "--iterations", "10", "--out", single, "--quiet", check=True)
    proc = torchrun(*INVERT, "--iterations", "10", "--out", double, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints
    assert summary["world_size"] == 2 and summary["images"] == 6
    _pools_equal(single, double)
    assert sorted(p.name for p in (double / "pool").iterdir()) == [
        "batch-00000-r0.safetensors", "batch-00001-r1.safetensors", "batch-00002-r0.safetensors"]
    events = read_events(double)
    assert {e["rank"] for e in events if e["event"] == "iteration"} == {0, 1}
    assert [e["event"] for e in events].count("run_end") == 1
    config = json.loads((double / "config.json").read_text())
    assert config["world_size"] == 2


def _wait_for(predicate, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    assert predicate()


@pytest.mark.slow
def test_a_stopped_sharded_run_resumes_to_the_same_result(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = (*INVERT, "--iterations", "400")
    smi(*args, "--out", reference, "--quiet", check=True)
    job = torchrun(*args, "--out", out, "--quiet", wait=False)

    def both_ranks_running() -> bool:
        events = read_events(out) if (out / "events.jsonl").exists() else []
        return {e["rank"] for e in events if e["event"] == "iteration" and e["iteration"] > 20} == {0, 1}

    _wait_for(both_ranks_running)
    RunDir(out).request("stop")
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert RunDir(out).checkpoint(0).is_file() and RunDir(out).checkpoint(1).is_file()
    proc = torchrun("invert", "--resume", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _pools_equal(reference, out)
    assert RunDir(out).is_finished and not RunDir(out).control.exists()


@pytest.mark.slow
def test_a_dead_rank_fails_the_job_and_leaves_valid_shards(tmp_path):
    out = tmp_path / "run"
    job = torchrun(*INVERT, "--iterations", "300", "--batches", "4", "--out", out, "--quiet", wait=False)

    def rank1_started_its_second_batch() -> bool:
        events = read_events(out) if (out / "events.jsonl").exists() else []
        return any(e["event"] == "batch_start" and e["batch"] == 3 for e in events)

    _wait_for(rank1_started_its_second_batch, 300)
    pid = next(e["pid"] for e in read_events(out) if e["event"] == "run_start" and e["rank"] == 1)
    os.kill(pid, signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank" in stderr and "1 (local_rank: 1)" in stderr  # torchrun names the rank that died
    written = shard_batches(out / "pool")
    assert 1 in written and 3 not in written
    load_pool(out)  # what was written loads
    smi("invert", "--resume", "--out", out, "--quiet", check=True)  # one process finishes the job
    assert sorted(shard_batches(out / "pool")) == [0, 1, 2, 3]


def test_distillation_under_two_ranks(tmp_path, digits_teacher):
    pool = tmp_path / "pool"
    smi("invert", "--teacher", digits_teacher, "--iterations", "4", "--batch-size", "8", "--batches", "2", "--no-flip",
        "--out", pool, "--quiet", "--device", "cpu", check=True)
    proc = torchrun("distill", "--teacher", digits_teacher, "--student", "vit_tiny_patch16_224", "--student-args",
                    "img_size=16,patch_size=4,depth=1,in_chans=1,embed_dim=48,num_heads=3", "--pool", pool,
                    "--data", "digits", "--epochs", "2", "--batch-size", "4", "--limit", "50", "--out", tmp_path / "kt",
                    "--json", "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2 and len(summary["history"]) == 2 and summary["synthetic_images"] == 16
    epochs = [e for e in read_events(tmp_path / "kt") if e["event"] == "epoch_end"]
    assert [e["rank"] for e in epochs] == [0, 0] and all(e["images"] == 16 for e in epochs)
    assert (tmp_path / "kt" / "student" / "model.safetensors").is_file()
