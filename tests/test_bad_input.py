"""Bad input, by class: numbers, full and read-only disks, two processes on one run, refused
resumes. Every refusal is one line naming the problem and the fix, exit 2, nothing written."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smi_cli.app import main
from smi_engine.runs.runlock import RunLock, holder_of, is_locked

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, read_events, smi, tree_snapshot

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5", "--device", "cpu")
BAD = ("0", "-1", "nan", "inf")


def _numeric_cases(teacher: Path, out: Path) -> list[tuple[list[str], str, tuple[str, ...]]]:
    """(command line before the option, option, the values it must refuse) for every command."""
    distill = ["distill", "--teacher", str(teacher), "--student", str(teacher), "--pool", str(teacher), "--data", "digits",
               "--out", str(out)]
    quantize = ["quantize", "--teacher", str(teacher), "--calib", "noise", "--data", "digits", "--out", str(out)]
    teacher_train = ["teacher", "train", "--data", "digits", *TINY[:6], "--out", str(out)]
    return [
        *((["invert", *TINY, "--out", str(out)], o, BAD) for o in ("--iterations", "--batch-size", "--batches", "--lr")),
        *((["invert", *TINY, "--out", str(out)], o, ("-1", "nan", "inf")) for o in ("--jitter", "--checkpoint-every")),
        (["invert", *TINY, "--out", str(out)], "--seed", ("nan", "inf")),
        *((quantize, o, BAD) for o in ("--w-bit", "--a-bit", "--calib-size", "--batch-size", "--percentile")),
        (quantize, "--limit", ("-1", "nan", "inf")),
        (quantize, "--seed", ("nan", "inf")),
        *((quantize, o, BAD) for o in ("--recon-iters", "--recon-lr", "--recon-p")),
        (quantize, "--recon-step-lr", ("-1", "nan", "inf")),
        (quantize, "--recon-drop", ("-1", "nan", "inf", "1")),
        *((distill, o, BAD) for o in ("--epochs", "--batch-size", "--lr", "--temperature", "--val-every",
                                      "--steps-per-round", "--grow", "--synth-batches")),
        *((distill, o, ("-1", "nan", "inf")) for o in ("--weight-decay", "--limit")),
        *((teacher_train, o, BAD) for o in ("--epochs", "--batch-size", "--lr")),
        (teacher_train, "--weight-decay", ("-1", "nan", "inf")),
        *((teacher_train, o, ("-1", "nan", "inf", "2")) for o in ("--label-smoothing", "--shift")),
        (teacher_train, "--limit", ("-1", "nan", "inf")),
        *((["eval", "--teacher", str(teacher), "--data", "digits"], o, v) for o, v in (("--limit", ("-1", "nan", "inf")),
                                                                                        ("--batch-size", BAD))),
        *((["bench", "--out", str(out / "bench.json")], o, BAD) for o in ("--batch-size", "--iterations", "--repeats")),
    ]


def test_every_numeric_option_refuses_0_minus_1_nan_and_inf_as_it_should(tmp_path, digits_teacher, capsys, monkeypatch):
    """Table-driven through the CLI's real entry point (in-process: 130 cases): one line on
    stderr naming the option, exit 2, and nothing created."""
    out = tmp_path / "out"
    checked = 0
    for head, option, values in _numeric_cases(digits_teacher, out):
        for value in values:
            monkeypatch.setattr(sys, "argv", ["smi", *head, option, value])
            with pytest.raises(SystemExit) as exited:
                main()
            err = capsys.readouterr().err
            lines = [line for line in err.strip().splitlines() if line.strip()]
            assert exited.value.code == 2, (head, option, value, err)
            assert len(lines) == 1 and "Traceback" not in err, (option, value, err)
            assert option in lines[0], (option, value, lines[0])  # the option itself, as the user wrote it
            assert not out.exists(), (option, value)
            checked += 1
    assert checked >= 130


def _plugin_option_cases(teacher: Path, out: Path) -> list[tuple[list[str], str]]:
    """(command line, what its one-line refusal says) for the options of every plugin kind."""
    invert = ["invert", *TINY, "--iterations", "2", "--batch-size", "2", "--out", str(out)]
    quantize = ["quantize", "--teacher", str(teacher), "--calib", "noise", "--data", "digits", "--scheme", "repq",
                "--out", str(out)]
    teacher_train = ["teacher", "train", "--data", "digits", *TINY[:6], "--epochs", "1", "--out", str(out)]
    distill = ["distill", "--teacher", str(teacher), "--student", str(teacher), "--pool", str(teacher), "--data",
               "digits", "--out", str(out)]
    return [
        (invert + ["--loss-option", "nope.x=1"], "--loss-option 'nope.x=1' is for loss 'nope', which this run does not use"),
        (invert + ["--loss-option", "deepinversion.bogus=1"], "loss 'deepinversion' has no option 'bogus'"),
        (invert + ["--loss-option", "deepinversion.bn_pretrained=maybe"], "bn_pretrained=maybe is not true or false"),
        (invert + ["--loss-option", "deepinversion.tv_l2=much"], "option tv_l2='much' is not a number"),
        (invert + ["--selection-option", "pri.leaving=freeze"], "is for selection 'pri', which this run does not use"),
        (invert + ["--selection", "pri", "--selection-option", "pri.keep_remaining=maybe"], "keep_remaining=maybe is not true or false"),
        (invert + ["--sink-option", "tensorboard.every=2"], "is for event sink 'tensorboard', which this run does not use"),
        (invert + ["--sink", "tensorboard", "--sink-option", "tensorboard.every=two"],
         "event sink 'tensorboard' option every='two' is not a whole number"),
        (invert + ["--sink", "tensorboard", "--sink-option", "tensorboard.every=0"], "tensorboard.every=0 is below 1"),
        (invert + ["--sink", "tensorboard", "--sink-option", "tensorboard.colour=red"],
         "event sink 'tensorboard' has no option 'colour': its options are every, images"),
        (teacher_train + ["--sink-option", "tensorboard.every=2"], "is for event sink 'tensorboard'"),
        (distill + ["--sink-option", "tensorboard.every=2"], "is for event sink 'tensorboard'"),
        (quantize + ["--scheme-option", "matmul.x=1"], "is for quantisation scheme 'matmul', which this run does not use"),
        (quantize + ["--scheme-option", "repq.nope=1"], "scheme 'repq' has no option 'nope'"),
        (quantize + ["--scheme-option", "repq.reparameterize=maybe"], "reparameterize=maybe is not true or false"),
        (quantize + ["--scheme-option", "repq.image_bits=1"], "repq.image_bits=1 is outside 2..16"),
        (quantize + ["--scheme-option", "repq"], "bad --scheme-option 'repq': write NAME.KEY=VALUE"),
        (quantize + ["--sparse-calib", "half"], "--sparse-calib 'half' is not one of hybrid, tokens, blanked"),
        (["task", "quantize", "-o", f"teacher_dir={teacher}", "-o", "data=digits", "--out", str(out)],
         "task 'quantize' needs option 'calib'"),
        (["task", "quantize", "-o", "calib=noise", "-o", "data=digits", "-o", "limit=few", "--out", str(out)],
         "task 'quantize' option limit='few' is not a whole number"),
    ]


def test_the_options_of_every_plugin_kind_are_typed_and_refused_in_one_line(tmp_path, digits_teacher, capsys, monkeypatch):
    """Losses, selections, sinks, schemes and tasks alike: an option for a plugin the run does not
    use, an unknown, missing or unconvertible one is one line naming it, exit 2, nothing written."""
    out = tmp_path / "out"
    for argv, message in _plugin_option_cases(digits_teacher, out):
        monkeypatch.setattr(sys, "argv", ["smi", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert exited.value.code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert message in lines[0], (argv, lines[0])
        assert not out.exists(), argv


@pytest.mark.parametrize("flags, message", [
    (("--model-args", "img_size=32,patch_size=4,depth=1,in_chans=1,embed_dim=48,num_heads=5"), "does not split into num_heads=5"),
    (("--model-args", "img_size=32,patch_size=4,depth=1,in_chans=1,num_heads=5"), "dim should be divisible by num_heads"),
    (("--model-args", "img_size=32,patch_size=0,depth=1,in_chans=1"), "patch_size=0 is not a whole number of at least 1"),
    (("--model-args", "img_size=32,patch_size=64,depth=1,in_chans=1"), "patch_size=64 is larger than img_size=32"),
    (("--model-args", "img_size=32,patch_size=4,depth=1,in_chans=1,num_classes=0"), "num_classes=0 is not a whole number"),
    (("--model-args", "img_size=32,patch_size=4,depth=1,in_chans=0"), "in_chans=0 is not a whole number"),
    (("--seed", str(2**64 + 1)), "--seed 18446744073709551617 must be in [0,"),
    (("--batches", "1000000000"), "--batches 1000000000 must be in [1, 1e+06]"),
    (("--mean", "nan"), "--mean/--std must be finite numbers"),
])
def test_impossible_models_and_resources_are_refused_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "run"
    base = ["invert", *TINY, "--iterations", "2", "--batch-size", "2", "--out", str(out)]
    for flag, value in zip(flags[::2], flags[1::2]):  # these flags replace TINY's own
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    assert_one_line_error(smi(*base), message)
    assert not out.exists()


def test_out_of_memory_says_what_to_lower_and_that_the_run_resumes():
    from smi_cli.console import describe_failure

    for exc in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"),
                RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")):
        message, code = describe_failure(exc)
        assert code == 2 and message.startswith("out of memory: lower --batch-size") and "--resume" in message


def test_loss_weights_and_options_must_be_finite_and_not_negative(tmp_path):
    for loss, fragment in (("deepinversion:nan", "--loss deepinversion:nan"), ("deepinversion:-1", "a negative one would maximise")):
        assert_one_line_error(smi("invert", *TINY, "--loss", loss, "--out", tmp_path / "a"), fragment)
    proc = smi("invert", *TINY, "--loss-option", "deepinversion.tv_l2=inf", "--out", tmp_path / "a")
    assert_one_line_error(proc, "deepinversion.tv_l2=inf is not a finite number")
    assert not (tmp_path / "a").exists()


def test_task_options_are_typed_and_unknown_keys_refused(tmp_path, digits_teacher):
    base = ("task", "quantize", "-o", f"teacher_dir={digits_teacher}", "-o", "calib=noise", "-o", "data=digits")
    assert_one_line_error(smi(*base, "-o", "w_bit=abc"), "option w_bit='abc' is not a whole number")
    assert_one_line_error(smi(*base, "-o", "unknown_key=1"), "task 'quantize' has no option 'unknown_key'")
    spec = "teacher={'name': 'vit_tiny_patch16_224', 'bogus': 1}"
    assert_one_line_error(smi("task", "quantize", "-o", spec, "-o", "calib=noise", "-o", "data=digits"),
                          "model spec has an unknown field 'bogus'")


def test_a_run_directory_belongs_to_one_live_process(tmp_path):
    """A second writer is refused naming the holder; a killed holder's lock never blocks."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", *TINY, "--iterations", "100000", "--batch-size", "2",
                              "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "events.jsonl").is_file() or not any(e["event"] == "iteration" for e in read_events(out)):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "slow"
            time.sleep(0.2)
        assert is_locked(out) and holder_of(out) == {"pid": first.pid, "host": socket.gethostname()}
        holder = f"in use by pid {first.pid} on {socket.gethostname()}"
        assert_one_line_error(smi("invert", "--resume", "--out", out), holder, "--stop")
        assert_one_line_error(smi("invert", *TINY, "--out", out), holder, "--stop")
        assert sum(e["event"] in ("run_start", "run_resumed") for e in read_events(out)) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not is_locked(out)  # the OS let go of the dead process's lock
    with RunLock(out):
        assert is_locked(out)


def test_a_refused_resume_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "smi_cli", "invert", *TINY, "--iterations", "100000", "--batch-size", "2",
                             "--checkpoint-every", "0.2", "--out", str(out), "--quiet"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    before = tree_snapshot(out)
    assert_one_line_error(smi("invert", "--resume", "--out", out), "resume checkpoint", "unreadable", "delete it")
    assert tree_snapshot(out) == before  # no run_resumed, no run_error, no lock rewritten


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs (root can mount one; elsewhere the test skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'}): the full-disk case needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_run_stays_resumable(tiny_disk):
    out = tiny_disk / "run"
    ballast = tiny_disk / "ballast"
    ballast.write_bytes(b"\0" * (460 * 1024))  # room for config and events, not for a 64 KiB pool shard
    proc = smi("invert", *TINY, "--iterations", "3", "--batch-size", "16", "--batches", "2", "--out", out, "--quiet")
    assert_one_line_error(proc, "the disk is full", "--resume")
    assert (out / "config.json").is_file() and not (out / "summary.json").exists()
    ballast.unlink()
    smi("invert", "--resume", "--out", out, "--quiet", check=True)
    assert (out / "summary.json").is_file()


def test_a_read_only_disk_is_one_line(tiny_disk, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    proc = smi("invert", *TINY, "--iterations", "2", "--batch-size", "2", "--out", tiny_disk / "run")
    assert_one_line_error(proc, "read-only file system")
    quantize = smi("bench", "--iterations", "2", "--out", tiny_disk / "bench.json")
    assert_one_line_error(quantize, "--out", "cannot be written")


def test_a_second_ctrl_c_waits_for_the_checkpoint_being_written():
    """The signal handler the CLI installs: while a checkpoint is being saved, Ctrl-C is noted
    and ignored; otherwise the second press aborts."""
    from rich.console import Console

    from smi_cli.signals import stop_on_signals
    from smi_engine.runs.control import RunControl

    control = RunControl()
    console = Console(file=open(os.devnull, "w"))
    with stop_on_signals(control, console):
        os.kill(os.getpid(), signal.SIGINT)
        assert control.stop_requested
        with control.saving_state():
            os.kill(os.getpid(), signal.SIGINT)  # does not raise: the save completes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_unwritable_output_paths_are_refused_before_any_work(tmp_path, digits_teacher):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(smi("quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits",
                              "--out", blocker / "q"), "--out", "cannot be written")
    assert_one_line_error(smi("demo", "--out", blocker, "--cache", tmp_path / "cache"), "--out", "is a file")
    assert not (tmp_path / "cache").exists()


def test_a_failed_download_leaves_no_folder_behind(tmp_path):
    """Downloads go through a proxy on a closed loopback port, so they fail fast on any machine."""
    target = tmp_path / "new" / "fashion"
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    assert_one_line_error(smi("data", "fetch", "fashion-mnist", target, env=offline), "download of fashion-mnist failed",
                          "check the network")
    assert not target.exists()
