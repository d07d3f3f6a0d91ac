"""Every command stops cleanly: Ctrl-C, SIGTERM and SIGHUP (an SSH drop) end a run with its
checkpoint (invert) or nothing half-written (quantize), exit 130 and one ending event."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, read_events, smi

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")


def _start(args, out, until):
    """The real CLI in a subprocess, once its log shows ``until(events)``."""
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", *map(str, args), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "events.jsonl").exists() and until(read_events(out)):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"never reached the point to signal: {proc.communicate()[1]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_scheduler_or_a_dropped_ssh_session_stops_an_inversion_with_its_checkpoint(tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(["invert", *TINY, "--iterations", "100000", "--batch-size", "2", "--schedule", "3:0.5",
                   "--device", "cpu", "--checkpoint-every", "0"], out,
                  lambda events: sum(e["event"] == "iteration" for e in events) > 5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped: " in stderr and "error" not in stderr and "smi invert --resume --out" in stderr
    assert (out / "checkpoint.pt").is_file()  # before: SIGHUP killed the run (exit 129) with none
    assert [e["event"] for e in read_events(out)][-1] == "run_interrupted"


@pytest.mark.parametrize("how, phase", [("sigint", "eval"), ("sigterm", "eval"), ("watch-stop", "eval"),
                                        ("sigint", "reconstruct")])
def test_quantize_stops_when_asked_and_says_so(tmp_path, digits_teacher, how, phase):
    out = tmp_path / "q"
    reconstruct = ["--reconstruct", "block", "--recon-iters", "100000"] if phase == "reconstruct" else []
    proc = _start(["quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits", "--calib-size", "8",
                   "--batch-size", "1", "--device", "cpu", *reconstruct], out,
                  lambda events: any(e["event"] == "progress" and e["phase"].startswith(phase) for e in events))
    if how == "watch-stop":
        told = smi("watch", out, "--stop")
        assert told.returncode == 0 and "asked" in told.stdout, told.stderr
    else:
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "stopping after" not in line]
    assert len(lines) == 1 and f"stopped while {phase}" in lines[0] and f"delete {out}" in lines[0], stderr
    assert lines[0].startswith("stopped: ") and "error" not in stderr  # asked for: not an error
    kinds = [e["event"] for e in read_events(out)]
    assert kinds[-1] == "run_interrupted" and "run_end" not in kinds and not (out / "summary.json").exists()
    listed = json.loads(smi("runs", out, "--json", check=True).stdout)
    assert listed[0]["status"] == "interrupted"  # not "dead"


def test_bad_launcher_variables_are_one_line_and_help_still_works(tmp_path):
    assert smi("--help", env={"WORLD_SIZE": "abc"}).returncode == 0
    args = ("invert", *TINY, "--iterations", "2", "--batch-size", "2", "--device", "cpu", "--out", tmp_path / "r")
    assert_one_line_error(smi(*args, env={"WORLD_SIZE": "abc"}), "WORLD_SIZE='abc'", "launch with torchrun")
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    proc = subprocess.run([sys.executable, "-m", "smi_cli", *map(str, args)], capture_output=True, text=True,
                          env={**env, "WORLD_SIZE": "2"}, timeout=120)
    assert_one_line_error(proc, "RANK is not set")
    assert not (tmp_path / "r").exists()
