"""The plugin contract, exercised by a real third-party package installed through its entry points."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import torch
from safetensors.torch import load_file

from smi_engine import SmiError, hookimpl
from smi_engine.plugins import PluginInfo, collect_entries
from smi_engine import hookspecs

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, read_events, smi

EXAMPLE = Path(__file__).parent / "plugin_example"
TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory) -> dict:
    """smi-example-plugin pip-installed (with its entry points) into a folder on PYTHONPATH."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source") / "plugin"
    # Built from a copy: parallel test workers would otherwise share the build folder.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_smi_plugins_lists_built_ins_and_third_parties(plugin_env):
    proc = smi("plugins", "--json", env=plugin_env, check=True)
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["deepinversion"]["losses"] == ["deepinversion"] and plugins["deepinversion"]["builtin"]
    assert plugins["psaq"]["losses"] == ["psaq"] and plugins["cmi"]["losses"] == ["cmi"]
    assert plugins["tasks"]["tasks"] == ["quantize", "kt"]
    example = plugins["example"]
    assert (example["distribution"], example["version"]) == ("smi-example-plugin", "0.4.0")
    assert example["losses"] == ["brightness"] and example["sinks"] == ["iteration-counter"] and not example["builtin"]
    assert example["selections"] == ["centre"] and plugins["selections"]["selections"] == ["smi", "pri", "random"]
    assert example["tasks"] == ["pool-size"] and example["schemes"] == ["linear-only"]
    assert "needs a package that is not installed" in plugins["broken"]["error"]
    assert "'broken'" in proc.stderr and "continuing without it" in proc.stderr  # named, not a traceback
    table = smi("plugins", env=plugin_env, check=True).stdout
    assert "brightness" in table and "smi-example-plugin" in table


def test_a_third_party_loss_and_sink_run_inside_smi_invert(plugin_env, tmp_path):
    out = tmp_path / "run"
    smi("invert", *TINY, "--iterations", "6", "--batch-size", "2", "--batches", "2", "--schedule", "3:0.5",
        "--device", "cpu", "--loss", "deepinversion", "--loss", "brightness:2", "--loss-option", "brightness.target=0.8",
        "--sink", "iteration-counter", "--sink-option", "iteration-counter.file=counts.json", "--out", out,
        env=plugin_env, check=True)
    iterations = [e for e in read_events(out) if e["event"] == "iteration"]
    assert len(iterations) == 12
    assert all("brightness.gap" in e["losses"] for e in iterations)
    assert all(e["losses"]["brightness.gap"] > 0 for e in iterations)
    assert json.loads((out / "counts.json").read_text()) == {"iterations": 12}  # the sink's own option
    assert not (out / "example-counter.json").exists()
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["losses"][1] == {"name": "brightness", "weight": 2.0, "options": {"target": 0.8}}
    assert config["sinks"] == ["iteration-counter"] and config["sink_options"] == {"iteration-counter": {"file": "counts.json"}}


def test_a_third_party_task_takes_typed_options_from_smi_task(plugin_env, tmp_path):
    env, out = {**plugin_env, "SMI_LOAD_PLUGINS": "example"}, tmp_path / "run"
    smi("invert", *TINY, "--iterations", "2", "--batch-size", "3", "--device", "cpu", "--out", out, "--quiet",
        env=env, check=True)
    result = json.loads(smi("task", "pool-size", "-o", f"pool={out}", env=env, check=True).stdout)
    assert result == {"pool": str(out), "images": 3}
    assert_one_line_error(smi("task", "pool-size", env=env), "task 'pool-size' needs option 'pool'")
    assert_one_line_error(smi("task", "pool-size", "-o", f"pool={out}", "-o", "size=2", env=env),
                          "task 'pool-size' has no option 'size': its options are pool")


def test_a_third_party_selection_decides_which_patches_stay(plugin_env, tmp_path):
    out = tmp_path / "run"
    summary = json.loads(smi("invert", *TINY, "--iterations", "4", "--batch-size", "2", "--schedule", "2:0.75",
                             "--selection", "centre", "--device", "cpu", "--out", out, "--json", env=plugin_env, check=True).stdout)
    assert summary["selection"] == "centre" and summary["patches_per_image"] == [48, 16] and summary["images"] == 4
    keep = load_file(str(next((out / "pool").glob("*.safetensors"))))["keep"]
    centre = torch.zeros(8, 8, dtype=torch.bool)
    centre[2:6, 2:6] = True  # on the 8 x 8 grid, the 16 patches nearest the centre
    assert torch.equal(keep[2:], centre.expand(2, -1, -1))  # the trajectories' final images
    assert torch.equal(keep[:2], (~centre).expand(2, -1, -1))  # what left at the stop: an image of its own
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["selection"] == {"name": "centre", "options": {}}


def test_a_third_party_quantisation_scheme_reconstructs_and_its_saved_model_reloads(plugin_env, tmp_path, digits_teacher):
    """The scheme contract end to end: the example's linear-only scheme calibrates, reconstructs
    the units it quantised (the patch embedding stays float, so it is none of them; with
    head=false the classifier neither), and its saved model rebuilds to the same top-1, but only
    where the plugin is installed."""
    common = ("--teacher", digits_teacher, "--calib", "real:digits", "--calib-size", "16", "--data", "digits",
              "--scheme", "linear-only", "--w-bit", "4", "--a-bit", "4", "--reconstruct", "block",
              "--recon-iters", "8", "--json", "--device", "cpu")
    out = tmp_path / "w4a4"
    result = json.loads(smi("quantize", *common, "--out", out, env=plugin_env, check=True).stdout)
    assert [u["name"] for u in result["reconstruction"]["units"]] == ["blocks.0", "blocks.1", "head"]
    assert result["scheme"] == "linear-only" and result["calibrator"] == "minmax"  # the scheme's default
    reloaded = json.loads(smi("eval", "--teacher", out, "--data", "digits", "--json", "--device", "cpu",
                              env=plugin_env, check=True).stdout)
    assert reloaded["top1"] == result["top1"]
    headless = json.loads(smi("quantize", *common, "--scheme-option", "linear-only.head=false",
                              env=plugin_env, check=True).stdout)
    assert [u["name"] for u in headless["reconstruction"]["units"]] == ["blocks.0", "blocks.1"]
    assert_one_line_error(smi("eval", "--teacher", out, "--data", "digits", "--device", "cpu"),
                          "quantised by scheme 'linear-only', which no installed plugin registers", "install the plugin")


def test_readme_documents_the_example_plugin_exactly():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n# smi_example_plugin\.py[^\n]*\n(.*?)```", readme, re.S)
    assert block, "README lost its example plugin"
    module = (EXAMPLE / "smi_example_plugin.py").read_text()
    assert module.split("\n\n", 1)[1] == block.group(1)  # all but the module docstring


def test_a_plugin_can_add_a_command(plugin_env):
    assert smi("example-hello", "--name", "smi", env=plugin_env, check=True).stdout.strip() == "hello smi from smi-example-plugin"


def test_SMI_LOAD_PLUGINS_limits_third_party_plugins(plugin_env):
    only_example = json.loads(smi("plugins", "--json", env={**plugin_env, "SMI_LOAD_PLUGINS": "example"}, check=True).stdout)
    assert {p["name"] for p in only_example} == {"deepinversion", "psaq", "cmi", "selections", "tasks", "quant_schemes", "tensorboard", "example"}
    none = smi("plugins", "--json", env={**plugin_env, "SMI_LOAD_PLUGINS": ""}, check=True)
    assert {p["name"] for p in json.loads(none.stdout)} == {"deepinversion", "psaq", "cmi", "selections", "tasks", "quant_schemes", "tensorboard"}
    assert none.stderr == ""


def test_unknown_sink_and_loss_are_one_line_errors(tmp_path):
    proc = smi("invert", *TINY, "--iterations", "2", "--batch-size", "2", "--sink", "wandb", "--out", tmp_path / "a")
    assert proc.returncode == 2 and "unknown event sink 'wandb'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = smi("invert", *TINY, "--iterations", "2", "--batch-size", "2", "--loss", "dreaminversion", "--out", tmp_path / "b")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown loss 'dreaminversion'" in proc.stderr and "deepinversion" in proc.stderr  # what is installed
    assert not (tmp_path / "b").exists()


class _Broken:
    @hookimpl
    def register_losses(self, register):
        register("fine-before-the-crash", lambda: None)
        raise RuntimeError("bug in the plugin")


class _Fine:
    @hookimpl
    def register_losses(self, register):
        register("fine", lambda: None)


def _collect_from(**plugins_by_name):
    """What ``collect_entries`` gathers from these plugin objects, and their PluginInfo records."""
    manager = pluggy.PluginManager("smi")
    manager.add_hookspecs(hookspecs)
    for name, plugin in plugins_by_name.items():
        manager.register(plugin, name=name)
    plugins = {n: PluginInfo(n, None, None, False) for n in plugins_by_name}
    return collect_entries(manager, plugins), plugins


def test_a_plugin_raising_at_registration_is_named_and_the_rest_still_load(capsys):
    entries, plugins = _collect_from(**{"fine-plugin": _Fine(), "broken-plugin": _Broken()})
    assert "fine" in entries["losses"]
    assert "bug in the plugin" in plugins["broken-plugin"].error
    assert "'broken-plugin' failed in register_losses" in capsys.readouterr().err


def test_duplicate_names_keep_the_first_and_warn(capsys):
    entries, _ = _collect_from(first=_Fine(), second=_Fine())
    assert entries["losses"]["fine"].plugin == "first"
    assert "already registered by 'first'" in capsys.readouterr().err


def test_a_plugin_failing_to_register_commands_never_breaks_smi(plugin_env):
    proc = smi("--help", env={**plugin_env, "SMI_LOAD_PLUGINS": "faulty-commands"})
    assert proc.returncode == 0 and "invert" in proc.stdout
    assert "'faulty-commands' failed in register_commands" in proc.stderr and "Traceback" not in proc.stderr


def test_a_loss_or_task_raising_at_run_time_is_named_in_one_line(plugin_env, tmp_path, digits_teacher):
    env = {**plugin_env, "SMI_LOAD_PLUGINS": "faulty-runtime"}
    out = tmp_path / "run"
    proc = smi("invert", "--teacher", digits_teacher, "--iterations", "4", "--batch-size", "2", "--loss", "exploding",
               "--out", out, "--quiet", "--device", "cpu", env=env)
    assert_one_line_error(proc, "loss 'exploding' (plugin faulty-runtime) failed at iteration 0",
                          "RuntimeError: the loss exploded", "--resume")
    events = read_events(out)
    assert events[-1]["event"] == "run_error" and "the loss exploded" in events[-1]["message"]
    assert not (out / "summary.json").exists()  # unfinished: `smi invert --resume` continues it once fixed
    task = smi("task", "exploding", env=env)
    assert_one_line_error(task, "task 'exploding' (plugin faulty-runtime) failed: RuntimeError: the task exploded")


def test_a_plugin_cannot_take_smi_down_or_over(plugin_env, tmp_path):
    """sys.exit at import, printing at import, a command named like smi's own."""
    takeover = {**plugin_env, "SMI_LOAD_PLUGINS": "hostile-takeover"}
    exits = smi("--help", env={**takeover, "SMI_HOSTILE_EXIT": "1"})
    assert exits.returncode == 0 and "invert" in exits.stdout  # before: every command, --help too, exited 3
    assert "'hostile-takeover'" in exits.stderr and "sys.exit(3)" in exits.stderr
    listed = smi("plugins", "--json", env=takeover)
    assert listed.returncode == 0 and json.loads(listed.stdout)  # what it printed at import is not on stdout
    assert "hostile plugin says hello" in listed.stderr
    ran = smi("invert", *TINY, "--iterations", "2", "--batch-size", "2", "--device", "cpu", "--out", tmp_path / "r",
              "--json", env=takeover)
    assert ran.returncode == 0 and json.loads(ran.stdout)["images"] == 2  # smi's invert, not the plugin's
    assert "registers command 'invert', which smi already has; keeping smi's" in ran.stderr
    assert smi("hostile-hello", env=takeover).stdout.strip() == "hello from a hostile plugin"


@pytest.mark.parametrize("sink, message", [
    ("chatty", None), ("exiting", "event sink 'exiting' failed and was disabled: PluginExit: called sys.exit(0)"),
    ("bad-close", "event sink 'bad-close' failed and was disabled: RuntimeError: close exploded"),
])
def test_a_sink_never_breaks_json_nor_ends_a_run(plugin_env, tmp_path, sink, message):
    out = tmp_path / "run"
    proc = smi("invert", *TINY, "--iterations", "3", "--batch-size", "2", "--device", "cpu", "--out", out,
               "--sink", sink, "--json", env={**plugin_env, "SMI_LOAD_PLUGINS": "hostile-sinks"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"] == 2  # stdout holds the JSON alone
    assert [e["event"] for e in read_events(out)][-1] == "run_end"
    if message is None:
        assert "sink saw iteration" in proc.stderr
    else:
        assert [line for line in proc.stderr.splitlines() if "sink" in line] == [f"smi: warning: {message}"]  # one line


def test_plugins_find_everything_in_one_module_which_imports_cheaply():
    """`from smi_engine import X` for every name a plugin needs; the import itself loads no torch."""
    probe = ("import sys, smi_engine\n"
             "assert 'torch' not in sys.modules, 'import smi_engine loaded torch'\n"
             "missing = [n for n in smi_engine.__all__ if getattr(smi_engine, n, None) is None]\n"
             "print(len(smi_engine.__all__), missing)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, missing = proc.stdout.split(" ", 1)
    assert int(count) >= 30 and missing.strip() == "[]"
    import smi_engine

    for name in ("hookimpl", "LossState", "InversionContext", "StopContext", "TaskContext", "QuantConfig", "QuantLinear",
                 "ModelFeeder", "Batch", "choice", "flag_value"):
        assert name in smi_engine.__all__, name


def test_plugin_options_arrive_as_the_types_their_factory_annotates():
    """Text from the command line (or a config.json) becomes bool, int, float or str as the
    factory says; before, `bn_pretrained=false` reached DeepInversion as the true string 'false'."""
    from smi_engine.plugins import call_factory

    seen = {}

    def factory(flag: bool = True, count: int = 1, rate: float | None = None, name: str = "x", free=None):
        seen.update(flag=flag, count=count, rate=rate, name=name, free=free)
        return seen

    call_factory(factory, {"flag": "false", "count": "3", "rate": "0.5", "name": 7, "free": "as-is"}, "loss 'f'", "--loss-option")
    assert seen == {"flag": False, "count": 3, "rate": 0.5, "name": "7", "free": "as-is"}
    for options, message in (({"count": "many"}, "count='many' is not a whole number"), ({"count": 2.5}, "is not a whole number"),
                             ({"flag": "maybe"}, "is not true or false"), ({"rate": "fast"}, "rate='fast' is not a number"),
                             ({"count": True}, "is not a whole number")):
        with pytest.raises(SmiError, match=message):
            call_factory(factory, options, "loss 'f'", "--loss-option f.KEY=VALUE")


def test_a_bad_task_option_is_named_as_such(tmp_path):
    proc = smi("task", "quantize", "-o", "not a pair")
    assert proc.returncode == 2 and "bad -o 'not a pair'" in proc.stderr and "model argument" not in proc.stderr
