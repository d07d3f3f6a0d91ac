"""Patch selection policies: which patches leave at a stop, and what the final image holds."""

import json

import pytest
import torch

from smi_engine.runs.state import RunState
from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus
from smi_engine.plugins import Registration, get_registry
from smi_engine.pool import load_pool
from smi_engine.inversion.selection import SelectionSpec

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, make_inverter, read_events, smi, step_through_stop

TINY = ("--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5")


def test_pri_emits_the_most_attended_patches_as_an_image_of_their_own(tiny_loaded):
    inverter = make_inverter(tiny_loaded, schedule="3:0.3", iterations=6, selection=SelectionSpec("pri"))
    run, before, patches, scores = step_through_stop(inverter, 3)
    leaving = scores.topk(20, dim=1).indices.sort(dim=1).values  # 64 - floor(64 * 0.7)
    cells = before.gather(1, leaving)
    remaining = torch.stack([torch.tensor(sorted(set(b.tolist()) - set(c.tolist()))) for b, c in zip(before, cells)])
    torch.testing.assert_close(run.state.image.kept, remaining)  # the least attended 44 keep evolving
    while run.step():
        pass
    result = run.finish()
    grid = inverter.grid
    assert len(result.images) == 8 and inverter.images_per_trajectory == 2 and inverter.patches_per_image == [20, 44]
    emitted, final = result.keep[:4].flatten(1), result.keep[4:].flatten(1)
    assert torch.equal(emitted, grid.mask_from_indices(cells).flatten(1))  # exactly the patches that left
    assert torch.equal(final, grid.mask_from_indices(remaining).flatten(1))  # the rest, inverted to the end
    assert not bool((emitted & final).any())  # non-overlapping
    expand = lambda index: index.unsqueeze(-1).expand(-1, -1, grid.patch_dim)
    # The emitted image holds the patches as they were when they left.
    torch.testing.assert_close(grid.patchify(result.images[:4]).gather(1, expand(cells)), patches.gather(1, expand(leaving)))
    assert result.labels.tolist() == run.targets.tolist() * 2
    assert result.trajectory.tolist() == [0, 1, 2, 3] * 2 and result.emitted_at.tolist() == [3] * 4 + [6] * 4


def test_smi_drops_the_least_attended_and_random_draws_from_the_batch_stream(tiny_loaded):
    run, before, _, scores = step_through_stop(make_inverter(tiny_loaded, schedule="3:0.3"), 3)
    expected = before.gather(1, scores.topk(44, dim=1).indices).sort(dim=1).values
    torch.testing.assert_close(run.state.image.kept, expected)

    random_inverter = make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("random"))
    first, _, _, _ = step_through_stop(random_inverter, 3)
    again, _, _, _ = step_through_stop(random_inverter, 3)
    assert torch.equal(first.state.image.kept, again.state.image.kept)  # the same stream decides the same way
    assert not torch.equal(first.state.image.kept, expected)  # and not by attention


@pytest.mark.parametrize("name, options, schedule, per_image", [
    ("smi", {}, "3:0.5,6:0.5", [16]),
    ("pri", {}, "3:0.5,6:0.5", [32, 16, 16]),  # one image per stop, then the final one
    ("pri", {"leaving": "freeze"}, "3:0.5,6:0.5", [64]),  # the frozen variant: one full image
    ("pri", {"leaving": "freeze", "keep_remaining": "false"}, "3:0.5,6:0.5", [48]),
    ("pri", {"keep_remaining": False}, "3:0.5,6:0.5", [32, 16]),
    ("random", {}, "every:3", [21, 21, 22]),  # floor(64 k / 3) at k = 1, 2: 21, 42
    ("random", {"leaving": "drop"}, "every:4", [16]),
])
def test_every_policy_makes_the_images_its_contract_says(tiny_loaded, name, options, schedule, per_image):
    """Each pool image's keep mask holds exactly its patches; the stop events know the final image."""
    events = []
    inverter = make_inverter(tiny_loaded, schedule=schedule, iterations=9, bus=EventBus([events.append]),
                             selection=SelectionSpec(name, options))
    result = inverter.invert_batch(0)
    assert inverter.patches_per_image == per_image
    assert result.keep.flatten(1).sum(1).tolist() == [n for n in per_image for _ in range(4)]
    stops = [e for e in events if e["event"] == "stop"]
    if inverter.final_image:
        assert stops[-1]["in_image"] == [per_image[-1]] * 4  # known from the last stop on
    by_trajectory = result.keep.flatten(1).view(len(per_image), 4, -1)
    if inverter.selection.leaving == "emit":
        assert int(by_trajectory.sum(0).max()) == 1  # a trajectory's images never share a patch
    previews = [e["iteration"] for e in events if e["event"] == "preview"]
    assert result.emitted_at.unique().tolist() == (
        [s["iteration"] for s in stops] * (inverter.selection.leaving == "emit") + [9] * inverter.final_image)
    assert previews == []  # no run directory, no previews


def test_every_v_detaches_equal_shares_at_k_floor_t_over_v(tiny_loaded):
    events = []
    inverter = make_inverter(tiny_loaded, schedule="every:4", iterations=10, bus=EventBus([events.append]),
                             selection=SelectionSpec("pri"))
    result = inverter.invert_batch(0)
    assert [e["iteration"] for e in events if e["event"] == "stop"] == [2, 4, 6]  # k * floor(10 / 4)
    assert inverter.kept_per_stage == [64, 48, 32, 16] and inverter.patches_per_image == [16] * 4
    assert result.keep.flatten(1).view(4, 4, -1).sum(0).eq(1).all()  # every patch in exactly one image
    # Teacher accuracy counts every image, each on its own patches alone.
    cells = result.keep.flatten(1).nonzero()[:, 1].view(16, 16)
    patches = inverter.grid.patchify(result.images).gather(1, cells.unsqueeze(-1).expand(-1, -1, inverter.grid.patch_dim))
    with torch.no_grad():
        correct = inverter.vit.forward(patches, cells).logits.argmax(1) == result.labels
    assert result.teacher_accuracy == pytest.approx(float(correct.float().mean()))


def test_rescored_final_mask_is_for_policies_that_keep_what_they_invert(tiny_loaded):
    with pytest.raises(SmiError, match="--final-mask rescored"):
        make_inverter(tiny_loaded, schedule="3:0.5", final_mask="rescored", selection=SelectionSpec("pri"))


class _Policy:
    """A third party's policy object, registered below without a package (the contract is the object)."""

    def __init__(self, choose, leaving="drop", keeps_remaining=True):
        self.choose, self.leaving, self.keeps_remaining = choose, leaving, keeps_remaining


@pytest.mark.parametrize("choose, message", [
    (lambda stop: stop.kept[:, :2], r"returned \(4, 2\)"),
    (lambda stop: torch.zeros(4, stop.leaving, dtype=torch.long), "same patch twice"),
    (lambda stop: torch.full((4, stop.leaving), 99, dtype=torch.long), "outside 0..63"),
    (lambda stop: 1 / 0, "selection 'custom' failed at iteration 3: ZeroDivisionError"),
])
def test_a_policy_that_breaks_the_contract_is_one_named_error(tiny_loaded, monkeypatch, choose, message):
    monkeypatch.setitem(get_registry().entries["selections"], "custom",
                        Registration("custom", lambda: _Policy(choose), "test"))
    inverter = make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("custom"))
    with pytest.raises(SmiError, match=message):
        step_through_stop(inverter, 3)


@pytest.mark.parametrize("policy, message", [
    (_Policy(None, "drop", False), "no image would be made"),
    (_Policy(None, "keep", True), "leaving='keep': it must be one of drop, freeze, emit"),
    (_Policy(None, True, True), "leaving=True"),
    (_Policy(None, "emit", "yes"), "keeps_remaining='yes': it must be True or False"),
])
def test_a_policy_object_outside_the_contract_is_refused_before_any_work(tiny_loaded, monkeypatch, policy, message):
    monkeypatch.setitem(get_registry().entries["selections"], "custom", Registration("custom", lambda: policy, "test"))
    with pytest.raises(SmiError, match=message):
        make_inverter(tiny_loaded, schedule="3:0.3", selection=SelectionSpec("custom"))


def test_an_emitting_policy_without_stops_or_final_image_is_refused(tiny_loaded):
    with pytest.raises(SmiError, match="no image would be made; give a schedule with stops"):
        make_inverter(tiny_loaded, schedule="dense", selection=SelectionSpec("pri", {"keep_remaining": False}))


def test_selection_flags_are_checked_before_anything_is_written(tmp_path):
    cases = [
        (("--selection", "nope"), "unknown selection 'nope'"),
        (("--selection", "pri", "--selection-option", "pri.keep_remaining=maybe"), "is not true or false"),
        (("--selection", "pri", "--selection-option", "pri.leaving=keep"), "pri.leaving=keep is not one of drop, freeze, emit"),
        (("--schedule", "every:1"), "every:V splits each trajectory into V >= 2 images"),
        (("--schedule", "every:9"), "needs at least 9 iterations"),
        (("--selection", "pri", "--selection-option", "pri.depth=2"), "selection 'pri' has no option 'depth'"),
        (("--selection", "smi", "--selection-option", "pri.keep_remaining=false"), "pass --selection pri"),
        (("--selection-option", "keep_remaining"), "write NAME.KEY=VALUE"),
        (("--precision", "fp8"), "unknown --precision 'fp8'"),
        (("--precision", "fp16", "--loss", "cmi"), "use --precision bf16"),
    ]
    for flags, message in cases:
        out = tmp_path / "run"
        proc = smi("invert", *TINY, "--schedule", "2:0.5", "--iterations", "4", "--batch-size", "2", *flags,
                   "--device", "cpu", "--out", out)
        assert_one_line_error(proc, message)
        assert not out.exists()


def test_pri_from_the_cli_records_its_choice_and_counts_its_images(tmp_path):
    out = tmp_path / "run"
    summary = json.loads(smi("invert", *TINY, "--schedule", "2:0.5,4:0.5", "--iterations", "6", "--batch-size", "2",
                             "--selection", "pri", "--selection-option", "pri.leaving=freeze",
                             "--selection-option", "pri.keep_remaining=false", "--device", "cpu",
                             "--out", out, "--json", check=True).stdout)
    assert summary["selection"] == "pri,leaving=freeze,keep_remaining=false" and summary["kept_patches"] == 48
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["selection"] == {"name": "pri", "options": {"leaving": "freeze", "keep_remaining": False}}  # typed, as the factory takes it
    emitting = json.loads(smi("invert", *TINY, "--schedule", "every:4", "--iterations", "8", "--batch-size", "2",
                              "--batches", "2", "--selection", "pri", "--device", "cpu", "--out", tmp_path / "pri",
                              "--json", check=True).stdout)
    assert (emitting["images"], emitting["trajectories"], emitting["images_per_trajectory"]) == (16, 4, 4)
    assert emitting["patches_per_image"] == [16] * 4 and emitting["kept_fraction"] == 0.25
    assert emitting["images_per_second"] == pytest.approx(16 / emitting["seconds"])
    assert emitting["speedup_bound_per_image"] == pytest.approx(4 * emitting["speedup_bound"])
    assert len(load_pool(tmp_path / "pri")) == 16
    listed = json.loads(smi("runs", tmp_path / "pri", "--json", check=True).stdout)
    assert [r["images"] for r in listed] == [16]
    state = RunState()  # what the dashboard and an unfinished run's listing count
    for event in read_events(tmp_path / "pri"):
        state.apply(event)
    assert (state.images_made, state.total_images, state.images_per_trajectory) == (16, 16, 4)
    human = smi("invert", *TINY, "--schedule", "2:0.5", "--iterations", "3", "--batch-size", "2", "--selection", "random",
                "--device", "cpu", "--out", tmp_path / "human", check=True).stdout
    assert "selection random" in human and "4 images from 2 trajectories" in human
