"""No text from a run, a plugin or a folder name reaches a terminal raw, nor is read as markup."""

import json
import random

import pytest

from smi_cli.console import markup_safe, plain
from smi_engine.runs.state import RunState

from .conftest import TINY_MODEL_ARGS, control_characters, hostile_value, smi

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[6n[bold red]x[/] a[/]c \u202eevil\r\n"
INVERT = ("invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5",
          "--iterations", "2", "--batch-size", "2", "--schedule", "1:0.5", "--device", "cpu")


def test_plain_writes_every_control_character_as_its_escape():
    assert plain("ok [b]") == "ok [b]"
    cleaned = plain(HOSTILE)
    assert cleaned.isprintable() and "\\x1b]0;owned\\x07" in cleaned and "\\u202e" in cleaned and "\\n" in cleaned
    assert markup_safe("a[/]c") == "a\\[/]c"


def test_a_run_named_like_markup_finishes_and_lists(tmp_path):
    out = tmp_path / "a[/]c [bold]"
    done = smi(*INVERT, "--out", out)
    assert done.returncode == 0, done.stderr  # before: MarkupError, exit 1, after the summary was written
    assert "a[/]c [bold]" in done.stdout
    for flags in ((), ("--quiet",), ("--json",)):
        listed = smi("runs", tmp_path, *flags)
        assert listed.returncode == 0, listed.stderr
        assert "a[/]c" in listed.stdout


def test_hostile_text_in_a_runs_files_never_reaches_the_terminal(tmp_path):
    out = tmp_path / "run"
    assert smi(*INVERT, "--out", out, "--quiet").returncode == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    events[0]["model"] = HOSTILE
    events[0]["schedule"] = HOSTILE
    events[0]["selection"] = HOSTILE
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = json.loads((out / "summary.json").read_text())
    summary["model"] = HOSTILE
    (out / "summary.json").write_text(json.dumps(summary))
    hostile_dir = tmp_path / ("run\x1b[2J" + "x")
    (tmp_path / "run").rename(hostile_dir)
    for flags, columns in (((), "200"), ((), "40"), (("--quiet",), "200")):
        listed = smi("runs", tmp_path, *flags, env={"COLUMNS": columns})
        assert listed.returncode == 0, listed.stderr
        assert control_characters(listed.stdout) == [] and control_characters(listed.stderr) == []
        assert "\\x1b" in listed.stdout  # shown, as its escape


def test_a_quantize_run_lists_its_scheme_options_and_hostile_ones_only_as_escapes(tmp_path):
    out = tmp_path / "w4a4"
    proc = smi("quantize", *INVERT[1:9], "--calib", "noise", "--calib-size", "8", "--data", "digits", "--limit", "8",
               "--scheme", "repq", "--scheme-option", "repq.softmax=uniform", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(smi("runs", out, "--json", check=True).stdout)
    assert row["schedule"] == "repq(softmax=uniform) W8A8"  # noise is whole images: no sparse feed to name
    summary = json.loads((out / "summary.json").read_text())
    summary["scheme_options"] = {HOSTILE: HOSTILE}
    (out / "summary.json").write_text(json.dumps(summary))
    listed = smi("runs", out, env={"COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert control_characters(listed.stdout) == [] and "\\x1b" in listed.stdout
    summary["scheme_options"] = ["not", "an", "object"]
    (out / "summary.json").write_text(json.dumps(summary))
    (row,) = json.loads(smi("runs", out, "--json", check=True).stdout)
    assert row["status"] == "damaged" and "scheme_options is not a JSON object" in row["reason"]


@pytest.mark.parametrize("seed", range(4))
def test_random_and_adversarial_events_never_raise_nor_leave_control_characters(seed):
    rng = random.Random(seed)
    kinds = ["run_start", "run_resumed", "batch_start", "batch_resumed", "iteration", "stop", "preview", "batch_end",
             "epoch_end", "train_step", "run_end", "run_error", "run_interrupted", "paused", "unpaused", "?"]
    fields = ["kind", "model", "schedule", "selection", "stops", "iterations", "batches", "batch_size", "grid",
              "num_patches", "prefix_tokens", "width", "batch", "iteration", "kept", "tokens", "seconds", "losses",
              "kept_indices", "path", "summary", "message", "tokens_per_s", "val_top1", "epoch", "epochs", "loss",
              "images", "images_per_trajectory", "gpu", "rss_mb", "pid", "host", "time", "world_size"]
    state = RunState()
    for _ in range(400):
        event = {"event": rng.choice(kinds), **{rng.choice(fields): hostile_value(rng) for _ in range(rng.randint(0, 8))}}
        state.apply(event)
    texts = [state.model, state.device, state.schedule, state.selection, state.error or "", state.interrupted or "",
             state.preview or "", *state.losses.series]
    assert all(isinstance(t, str) and control_characters(t) == [] for t in texts)
    # every derived figure still computes
    state.eta_seconds, state.images_per_second, state.seconds_per_iteration, state.flops_fraction, state.status


@pytest.mark.parametrize("damage", [
    ("config.json", "[]"), ("config.json", '{"kind": "invert", "conf'), ("summary.json", '{"teacher_accuracy": "high"}'),
    ("summary.json", '{"active_seconds": "long", "teacher_accuracy": 0.5}'), ("summary.json", "[1, 2]"),
])
def test_one_damaged_run_is_listed_as_damaged_and_hides_no_other(tmp_path, damage):
    for name in ("good", "bad"):
        assert smi(*INVERT, "--out", tmp_path / name, "--quiet").returncode == 0
    file, text = damage
    (tmp_path / "bad" / file).write_text(text)
    listed = json.loads(smi("runs", tmp_path, "--json", check=True).stdout)
    status = {r["run"].rsplit("/", 1)[-1]: r["status"] for r in listed}
    assert status == {"good": "finished", "bad": "damaged"}
    bad = next(r for r in listed if r["run"].endswith("bad"))
    assert bad["reason"] and (file in bad["reason"] or "number" in bad["reason"] or "object" in bad["reason"])
    for columns in ("200", "40"):
        shown = smi("runs", tmp_path, env={"COLUMNS": columns})
        assert shown.returncode == 0 and "damaged" in shown.stdout and "finished" in shown.stdout, shown.stderr


def test_event_logs_are_streamed_with_bounded_lines(tmp_path):
    from smi_engine.runs.events import MAX_EVENT_LINE, iter_events

    log = tmp_path / "events.jsonl"
    huge = json.dumps({"event": "iteration", "pad": "x" * (MAX_EVENT_LINE + 10)})
    log.write_text('{"event": "run_start"}\n' + huge + "\n" + "not json\n" + '{"event": "run_end"}\n' + '{"event": "ha')
    assert [e["event"] for e in iter_events(log)] == ["run_start", "damaged_line", "damaged_line", "run_end"]
