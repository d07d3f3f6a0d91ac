"""The one run lifecycle every command shares: claim, start, end in exactly one way, release."""

import contextlib
import json

import pytest

from smi_engine.runs.control import RunInterrupted
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus
from smi_engine.runs.rundir import RunDir
from smi_engine.runs.runlock import is_locked
from smi_engine.runs.session import RunSession

from .conftest import read_events, smi

ENDINGS = {"run_end", "run_interrupted", "run_error"}


def _session(path, **options) -> RunSession:
    return RunSession(RunDir(path), "test", EventBus(), **options)


@pytest.mark.parametrize("raised, ending", [
    (None, "run_end"), (RunInterrupted("stopped at batch 1, iteration 3", 0, 3), "run_interrupted"),
    (KeyboardInterrupt(), "run_interrupted"), (ValueError("broken"), "run_error"), (SystemExit(0), "run_error"),
])
def test_a_run_ends_in_exactly_one_way_and_is_released(tmp_path, raised, ending):
    out = tmp_path / "run"
    session = _session(out).claim({"answer": 42})
    assert is_locked(out)
    with pytest.raises(type(raised)) if raised is not None else contextlib.nullcontext():
        with session:
            session.start(extra=1)
            if raised is not None:
                raise raised
            session.end({"result": 1})
    assert not is_locked(out)
    events = read_events(out)
    assert [e["event"] for e in events] == ["run_start", ending]
    start = events[0]
    assert start["kind"] == "test" and start["extra"] == 1 and {"pid", "host", "versions", "world_size"} <= set(start)
    assert set(start["versions"]) == {"smi", "torch", "timm", "python"}
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "test" and config["config"] == {"answer": 42} and "versions" in config
    assert (out / "summary.json").exists() == (ending == "run_end")
    if isinstance(raised, RunInterrupted):
        assert (events[1]["batch"], events[1]["iteration"]) == (0, 3)


def test_a_failure_after_the_end_is_not_a_second_ending(tmp_path):
    session = _session(tmp_path / "run").claim({})
    with pytest.raises(OSError):
        with session:
            session.start()
            session.end({})
            raise OSError("the terminal went away while printing the summary")
    assert [e["event"] for e in read_events(tmp_path / "run")] == ["run_start", "run_end"]


def test_a_failure_right_after_the_lock_is_taken_releases_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TypeError):
        _session(out).claim({"not json": object()})  # config.json cannot be written
    assert not is_locked(out) and not (out / "config.json").exists()
    _session(out).claim({"fine": True}).__exit__(None, None, None)  # the folder is free again
    assert not is_locked(out)


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = _session(out).claim({})
    with pytest.raises(SmiError, match="in use by pid"):
        _session(out).claim({})
    first.__exit__(None, None, None)
    with pytest.raises(SmiError, match="unfinished test run"):
        _session(out).check_claimable()


def test_every_command_that_writes_a_run_records_its_process_and_software(tmp_path):
    """invert, teacher train and quantize --out, through the real CLI: run_start names pid, host
    and versions, and the log ends in exactly one ending."""
    teacher = tmp_path / "teacher"
    smi("teacher", "train", "--data", "digits", "--model", "vit_tiny_patch16_224", "--model-args",
        "img_size=16,patch_size=4,depth=1,in_chans=1,embed_dim=32,num_heads=2", "--mean", "0.5", "--std", "0.5",
        "--epochs", "1", "--limit", "64", "--no-flip", "--device", "cpu", "--out", teacher, "--quiet", check=True)
    smi("invert", "--teacher", teacher, "--iterations", "2", "--batch-size", "2", "--device", "cpu",
        "--out", tmp_path / "invert", "--quiet", check=True)
    smi("quantize", "--teacher", teacher, "--calib", tmp_path / "invert", "--data", "digits", "--limit", "32",
        "--calib-size", "2", "--device", "cpu", "--out", tmp_path / "quantize", "--quiet", check=True)
    for name, kind in (("teacher", "teacher"), ("invert", "invert"), ("quantize", "quantize")):
        events = read_events(tmp_path / name)
        assert events[0]["event"] == "run_start" and events[0]["kind"] == kind, name
        assert {"pid", "host", "versions"} <= set(events[0]), name
        assert [e["event"] for e in events if e["event"] in ENDINGS] == ["run_end"], name
        assert not is_locked(tmp_path / name)
