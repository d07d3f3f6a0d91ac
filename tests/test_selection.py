"""Patch selection policies: which patches leave at a stop, and what the final image holds."""

import json

import pytest
import torch

from smi_engine.errors import SmiError
from smi_engine.events import EventBus
from smi_engine.invert import _BatchState
from smi_engine.plugins import Registration, get_registry
from smi_engine.selection import SelectionSpec
from smi_engine.sparse_image import SparseImage

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, make_inverter, smi

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")


def _stop_once(inverter, state=None):
    """Run the stop at iteration 3 on a half-stopped batch; returns (state, kept before, scores)."""
    grid = inverter.grid
    generator = torch.Generator().manual_seed(0)
    if state is None:
        kept = torch.stack([torch.randperm(64, generator=generator)[:50].sort().values for _ in range(4)])
        state = _BatchState(SparseImage(grid, torch.randn(4, 64, grid.patch_dim, generator=generator), kept), 0.1, (0.5, 0.99))
        state.dropped.scatter_(1, torch.stack([torch.tensor(sorted(set(range(64)) - set(k.tolist()))) for k in kept]), True)
    before = state.image.kept.clone()
    scores = inverter.vit.cls_attention(state.image.param.detach(), before)
    inverter._stop(0, 3, state, generator)
    return state, before, scores


def test_pri_detaches_the_most_attended_patches_and_keeps_them_in_the_image(tiny_loaded):
    inverter = make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("pri"))
    state, before, scores = _stop_once(inverter)
    leaving = before.gather(1, scores.topk(15, dim=1).indices)
    remaining = torch.stack([torch.tensor(sorted(set(b.tolist()) - set(l.tolist()))) for b, l in zip(before, leaving)])
    torch.testing.assert_close(state.image.kept, remaining)  # the least attended 35 keep evolving
    in_image = inverter._in_image(state).flatten(1)
    assert bool(in_image.gather(1, leaving).all())  # detached patches stay in the image, frozen
    assert in_image.sum(1).tolist() == [50] * 4  # the 14 dropped before this stop stay dropped


def test_smi_drops_the_least_attended_and_random_draws_from_the_batch_stream(tiny_loaded):
    smi_inverter = make_inverter(tiny_loaded, schedule="3:0.3")
    state, before, scores = _stop_once(smi_inverter)
    expected = before.gather(1, scores.topk(35, dim=1).indices).sort(dim=1).values
    torch.testing.assert_close(state.image.kept, expected)
    assert torch.equal(smi_inverter._in_image(state).flatten(1).sum(1), torch.tensor([35] * 4))

    random_inverter = make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("random"))
    first, _, _ = _stop_once(random_inverter)
    again, _, _ = _stop_once(random_inverter)
    assert torch.equal(first.image.kept, again.image.kept)  # the same stream decides the same way
    assert not torch.equal(first.image.kept, expected)  # and not by attention
    assert all(set(k.tolist()) <= set(b.tolist()) for k, b in zip(first.image.kept, before))


def test_final_masks_of_each_policy_over_a_whole_run(tiny_loaded):
    """The pool's keep mask holds exactly the patches in the final image, with pixels frozen as they left."""
    results = {}
    for name, options in (("smi", {}), ("pri", {}), ("pri", {"keep_remaining": "false"}), ("random", {"keep_leaving": True})):
        events = []
        inverter = make_inverter(tiny_loaded, schedule="3:0.5,6:0.5", iterations=8, bus=EventBus([events.append]),
                                 selection=SelectionSpec(name, options))
        result = inverter.invert_batch(0)
        results[(name, bool(options))] = result, [e for e in events if e["event"] == "stop"], inverter
    counts = {key: result.keep.flatten(1).sum(1).tolist() for key, (result, _, _) in results.items()}
    assert counts == {("smi", False): [16] * 4, ("pri", False): [64] * 4, ("pri", True): [48] * 4, ("random", True): [64] * 4}
    for key, (result, stops, inverter) in results.items():
        assert inverter.final_kept == counts[key][0]
        assert stops[-1]["in_image"] == counts[key]  # known from the last stop on
    pri_detached, stops, _ = results[("pri", True)]
    last_optimised = torch.tensor(stops[-1]["kept_indices"])
    assert not bool(pri_detached.keep.flatten(1).gather(1, last_optimised).any())  # only the detached patches


def test_rescored_final_mask_is_for_policies_that_keep_what_they_invert(tiny_loaded):
    with pytest.raises(SmiError, match="--final-mask rescored"):
        make_inverter(tiny_loaded, schedule="3:0.5", final_mask="rescored", selection=SelectionSpec("pri"))


class _Policy:
    """A third party's policy object, registered below without a package (the contract is the object)."""

    def __init__(self, choose, keeps_leaving: bool, keeps_remaining: bool):
        self.choose, self.keeps_leaving, self.keeps_remaining = choose, keeps_leaving, keeps_remaining


@pytest.mark.parametrize("choose, message", [
    (lambda stop: stop.kept[:, :2], r"returned \(4, 2\)"),
    (lambda stop: torch.zeros(4, stop.leaving, dtype=torch.long), "same patch twice"),
    (lambda stop: torch.full((4, stop.leaving), 99, dtype=torch.long), "outside 0..49"),
    (lambda stop: 1 / 0, "selection 'custom' failed at iteration 3: ZeroDivisionError"),
])
def test_a_policy_that_breaks_the_contract_is_one_named_error(tiny_loaded, monkeypatch, choose, message):
    monkeypatch.setitem(get_registry().entries["selections"], "custom",
                        Registration("custom", lambda: _Policy(choose, False, True), "test"))
    inverter = make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("custom"))
    with pytest.raises(SmiError, match=message):
        _stop_once(inverter)


def test_a_policy_keeping_nothing_is_refused(tiny_loaded):
    with pytest.raises(SmiError, match="final image would be empty"):
        make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("pri", {"keep_leaving": False, "keep_remaining": False}))


def test_selection_flags_are_checked_before_anything_is_written(tmp_path):
    cases = [
        (("--selection", "nope"), "unknown selection 'nope'"),
        (("--selection", "pri", "--selection-option", "pri.keep_leaving=maybe"), "is not true or false"),
        (("--selection", "pri", "--selection-option", "pri.depth=2"), "selection 'pri' has no option 'depth'"),
        (("--selection", "smi", "--selection-option", "pri.keep_remaining=false"), "pass --selection pri"),
        (("--selection-option", "keep_leaving"), "write NAME.KEY=VALUE"),
        (("--precision", "fp8"), "unknown --precision 'fp8'"),
        (("--precision", "fp16", "--loss", "cmi"), "use --precision bf16"),
    ]
    for flags, message in cases:
        out = tmp_path / "run"
        proc = smi("invert", *TINY, "--schedule", "2:0.5", "--iterations", "4", "--batch-size", "2", *flags,
                   "--device", "cpu", "--out", out)
        assert_one_line_error(proc, message)
        assert not out.exists()


def test_pri_from_the_cli_records_its_choice_and_fills_the_image(tmp_path):
    out = tmp_path / "run"
    summary = json.loads(smi("invert", *TINY, "--schedule", "2:0.5,4:0.5", "--iterations", "6", "--batch-size", "2",
                             "--selection", "pri", "--selection-option", "pri.keep_remaining=false", "--device", "cpu",
                             "--out", out, "--json", check=True).stdout)
    assert summary["selection"] == "pri,keep_remaining=false" and summary["kept_patches"] == 48
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["selection"] == {"name": "pri", "options": {"keep_remaining": "false"}}
    human = smi("invert", *TINY, "--schedule", "2:0.5", "--iterations", "3", "--batch-size", "2", "--selection", "random",
                "--device", "cpu", "--out", tmp_path / "human", check=True).stdout
    assert "selection random" in human
