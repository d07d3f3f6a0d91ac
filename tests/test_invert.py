"""The inversion loop: stopping rule, frozen pixels, dense == DeepInversion, reproducibility."""

import math

import pytest
import torch
import torch.nn.functional as F

from smi_engine.vit.augment import Jitter
from smi_engine.runs.events import EventBus
from smi_engine.inversion.batch import BatchState, batch_generator, make_targets
from smi_engine.errors import SmiError
from smi_engine.models import ModelSpec, load_model
from smi_engine.vit.sparse_image import SparseImage

from .conftest import make_inverter


class Recorder:
    """A real loss plugin object (returns a zero term) that keeps what each iteration saw."""

    def __init__(self):
        self.images, self.kept = [], []

    def __call__(self, state):
        self.images.append(state.images.detach().clone())
        self.kept.append(state.keep.clone())
        return state.logits.sum() * 0.0


def _with_recorder(inverter):
    recorder = Recorder()
    spec = type(inverter.losses[0][0])("recorder")
    inverter.losses.append((spec, recorder))
    return recorder


def test_stop_keeps_floor_of_remaining_ranked_by_last_block_cls_attention(tiny_loaded):
    inverter = make_inverter(tiny_loaded, schedule="2:0.25,3:0.3", attention="explicit")
    run = inverter.start_batch(0)
    run.step(), run.step(), run.step()  # through the first stop: 48 of 64 cells left, unsorted gaps
    kept, patches = run.state.image.kept.clone(), run.state.image.param.detach().clone()
    captured = []
    hook = tiny_loaded.model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        inverter.vit.forward(patches, kept)
    hook.remove()
    scores = captured[-1].mean(1)[:, 0, 1:]  # class-token row, heads averaged, patches only
    run.step()  # the stop at iteration 3
    assert run.state.image.kept.shape == (4, math.floor(48 * 0.7))
    expected = kept.gather(1, scores.topk(33, dim=1).indices).sort(dim=1).values
    torch.testing.assert_close(run.state.image.kept, expected)


def test_kept_sets_only_shrink_and_prefix_tokens_are_always_fed(tiny_loaded):
    events = []
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule="2:0.3,5:0.5,8:0.25", iterations=10)
    inverter.invert_batch(0)
    stops = [e for e in events if e["event"] == "stop"]
    assert [s["kept"] for s in stops] == [44, 22, 16]
    previous = [set(range(64))] * 4
    for stop in stops:
        current = [set(row) for row in stop["kept_indices"]]
        assert all(len(c) == stop["kept"] for c in current)
        assert all(c <= p for c, p in zip(current, previous))
        previous = current
    iterations = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in iterations] == list(range(10))
    assert [e["kept"] for e in iterations] == [64, 64, 44, 44, 44, 22, 22, 22, 16, 16]
    assert all(e["tokens"] == e["kept"] + 1 for e in iterations)  # the class token is always fed


def test_stopped_pixels_never_change_after_their_stop(tiny_loaded):
    inverter = make_inverter(tiny_loaded, schedule="3:0.5,6:0.5", iterations=10)
    recorder = _with_recorder(inverter)
    result = inverter.invert_batch(0)
    grid = inverter.grid
    for stop_at in (3, 6):
        stopped = grid.pixel_mask(recorder.kept[stop_at - 1] & ~recorder.kept[stop_at])
        frozen = recorder.images[stop_at][stopped.expand_as(recorder.images[stop_at])]
        assert frozen.numel() > 0
        for later in recorder.images[stop_at + 1 :] + [result.images]:
            torch.testing.assert_close(later[stopped.expand_as(later)], frozen, rtol=0, atol=0)
    # while the kept pixels went on changing
    kept_pixels = grid.pixel_mask(result.keep).expand_as(result.images)
    assert not torch.equal(recorder.images[-1][kept_pixels], recorder.images[6][kept_pixels])


def test_dense_mode_is_plain_deepinversion(tiny_loaded):
    """The dense path equals a hand-written DeepInversion loop on full images."""
    events = []
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule="dense", iterations=8, lr=0.1)
    inverter.invert_batch(0)
    losses = [e["losses"]["total"] for e in events if e["event"] == "iteration"]

    grid, model = inverter.grid, tiny_loaded.model
    generator = batch_generator(0, 0)
    targets = make_targets("balanced", 0, 4, 10, generator)
    x = torch.randn(4, 1, 32, 32, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.99))
    low, high = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5
    reference = []
    for _ in range(8):
        augmented = Jitter.sample(grid, 0.125, True, generator).apply(x)
        diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
                 x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
        loss = F.cross_entropy(model(augmented), targets) + 1e-4 * sum(torch.norm(d) for d in diffs)
        reference.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_seeded_runs_are_reproducible_and_seeds_differ(tiny_loaded):
    a = make_inverter(tiny_loaded, schedule="3:0.3").invert_batch(1)
    b = make_inverter(tiny_loaded, schedule="3:0.3").invert_batch(1)
    c = make_inverter(tiny_loaded, schedule="3:0.3", seed=7).invert_batch(1)
    assert torch.equal(a.images, b.images) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("schedule", ["dense", "10:0.3,20:0.3"])
def test_inversion_drives_a_trained_teacher_to_the_targets(digits_teacher, schedule):
    loaded = load_model(ModelSpec.from_dir(digits_teacher))
    events = []
    # no jitter: this teacher never saw shifted digits (augmentation has its own exact tests)
    inverter = make_inverter(loaded, bus=EventBus([events.append]), schedule=schedule, iterations=60, lr=0.1,
                             batch_size=10, flip=False, jitter=0.0)
    result = inverter.invert_batch(0)
    start = F.cross_entropy(inverter.vit.forward_images(torch.randn(10, 1, 16, 16)), result.labels)
    final = F.cross_entropy(inverter.vit.forward_images(result.images, result.keep), result.labels)
    assert final < 0.1 * start
    assert result.teacher_accuracy == 1.0  # every image is classified as its target, under its keep mask
    assert result.labels.tolist() == list(range(10))


def test_pixels_stay_in_the_valid_range(tiny_loaded):
    result = make_inverter(tiny_loaded, lr=5.0).invert_batch(0)  # a huge step would leave [0, 1]
    pixels = tiny_loaded.normalizer.denormalize(result.images)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_adam_moments_follow_their_patches_through_a_stop(tiny_loaded):
    inverter = make_inverter(tiny_loaded)
    grid = inverter.grid
    state = BatchState(SparseImage(grid, torch.randn(2, 64, 16), torch.arange(64).expand(2, -1).clone()), 0.1, (0.5, 0.99))
    state.image.param.grad = torch.randn_like(state.image.param)
    state.optimizer.step()
    moments = state.optimizer.state[state.image.param]["exp_avg"].clone()
    selected = torch.tensor([[1, 5, 7], [0, 2, 63]])
    state.shrink(selected)
    carried = state.optimizer.state[state.image.param]
    torch.testing.assert_close(carried["exp_avg"], moments.gather(1, selected.unsqueeze(-1).expand(-1, -1, 16)))
    assert float(carried["step"]) == 1.0


def test_targets():
    g = torch.Generator().manual_seed(0)
    assert make_targets("balanced", 0, 4, 10, g).tolist() == [0, 1, 2, 3]
    assert make_targets("balanced", 3, 4, 10, g).tolist() == [2, 3, 4, 5]  # 12..15 wrap around 10 classes
    assert make_targets("7,2", 0, 5, 10, g).tolist() == [2, 2, 7, 7, 7]
    assert make_targets("random", 0, 64, 10, g).max() < 10
    with pytest.raises(SmiError, match="outside 0..9"):
        make_targets("3,12", 0, 4, 10, g)
    with pytest.raises(SmiError, match="balanced, random"):
        make_targets("cats", 0, 4, 10, g)


def test_batches_have_independent_random_streams():
    first = torch.randn(3, generator=batch_generator(0, 0))
    assert torch.equal(first, torch.randn(3, generator=batch_generator(0, 0)))
    assert not torch.equal(first, torch.randn(3, generator=batch_generator(0, 1)))
    assert not torch.equal(first, torch.randn(3, generator=batch_generator(1, 0)))


def test_rescored_final_mask_is_the_seeds_top_patches_of_the_final_image(tiny_loaded):
    """--final-mask rescored: int((N + 1) * 0.7 * 0.7) = 31 patches (one more than the 30
    inverted), the top ones by the last block's CLS attention on the final image."""
    inverter = make_inverter(tiny_loaded, schedule="3:0.3,6:0.3", final_mask="rescored", attention="explicit")
    result = inverter.invert_batch(0)
    assert inverter.patches_per_image == [31] and result.keep.sum(dim=(1, 2)).tolist() == [31] * 4
    grid = inverter.grid
    patches = grid.patchify(result.images)
    positions = torch.arange(grid.num_patches).expand(4, -1)
    top = inverter.vit.cls_attention(patches, positions).topk(31, dim=1).indices.sort(dim=1).values
    assert torch.equal(grid.mask_from_indices(top), result.keep)
    inverted = make_inverter(tiny_loaded, schedule="3:0.3,6:0.3").invert_batch(0)
    assert inverted.keep.sum(dim=(1, 2)).tolist() == [30] * 4
    with pytest.raises(SmiError, match="unknown --final-mask 'best'"):
        make_inverter(tiny_loaded, final_mask="best")


@pytest.mark.parametrize("jitter_at_stops", [True, False])
def test_the_seed_steps_on_the_plain_image_around_stops(tiny_loaded, jitter_at_stops):
    inverter = make_inverter(tiny_loaded, schedule="4:0.3,8:0.3", jitter=0.25, jitter_at_stops=jitter_at_stops)
    seen = []
    spec = type(inverter.losses[0][0])("jitter-recorder")
    inverter.losses.append((spec, lambda state: seen.append(torch.equal(state.tokens, state.patches)) or state.logits.sum() * 0.0))
    inverter.invert_batch(0)
    plain = {it for it, identity in enumerate(seen) if identity}
    if jitter_at_stops:
        assert not plain >= {3, 4, 7, 8}  # random rolls everywhere (a zero roll may happen by chance)
    else:
        assert plain >= {3, 4, 7, 8} and len(plain - {3, 4, 7, 8}) < 4


class _DtypeRecorder:
    """A real loss object (a zero term) that records the dtype the teacher's logits came in."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, state):
        self.dtypes.append(state.logits.dtype)
        return state.logits.float().sum() * 0.0


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_runs_the_teacher_in_it_and_keeps_pixels_and_adam_in_fp32(tiny_loaded, precision, dtype):
    inverter = make_inverter(tiny_loaded, schedule="3:0.5", precision=precision, iterations=6)
    recorder = _DtypeRecorder()
    inverter.losses.append((type(inverter.losses[0][0])("recorder"), recorder))
    run = inverter.start_batch(0)
    while run.step():
        pass
    assert set(recorder.dtypes) == {dtype}
    adam = run.state.optimizer.state[run.state.image.param]
    assert run.state.image.param.dtype == adam["exp_avg"].dtype == adam["exp_avg_sq"].dtype == torch.float32
    result = run.finish()
    reference = make_inverter(tiny_loaded, schedule="3:0.5", iterations=6).invert_batch(0)
    assert result.losses["total"] == pytest.approx(reference.losses["total"], rel=0.05)  # close to fp32, not equal
    assert result.losses["total"] != reference.losses["total"]


def test_reporting_a_window_of_iterations_at_once_changes_nothing_but_when(tiny_loaded):
    """On CUDA the loss values of 16 iterations reach the host together (no sync per iteration):
    the same events, values and best image as reporting every iteration; a non-finite term is
    still named with its iteration."""
    runs = {}
    for window in (1, 4):
        events = []
        inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule="3:0.5,6:0.5", iterations=11)
        run = inverter.start_batch(0)
        run.window = window
        while run.step():
            pass
        runs[window] = run.finish(), [(e["iteration"], e["losses"], e["kept"]) for e in events if e["event"] == "iteration"]
    (one, one_events), (four, four_events) = runs[1], runs[4]
    assert one_events == four_events and [i for i, _, _ in four_events] == list(range(11))
    assert torch.equal(one.images, four.images) and one.best_loss == four.best_loss
    assert sum(one.stage_iterations) == sum(four.stage_iterations) == 11 and four.stage_iterations == [3, 3, 5]

    class Explodes:
        def __call__(self, state):
            return state.logits.sum() * (math.inf if state.iteration == 5 else 0.0)

    inverter = make_inverter(tiny_loaded, schedule="dense", iterations=8)
    inverter.losses.append((type(inverter.losses[0][0])("explodes"), Explodes()))
    run = inverter.start_batch(0)
    run.window = 4
    with pytest.raises(SmiError, match=r"loss term 'explodes' became (inf|nan) at iteration 5"):
        while run.step():
            pass


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_result(tiny_loaded):
    """--compile: one graph per stage's token count, same maths as eager (to float tolerance)."""
    eager = make_inverter(tiny_loaded, schedule="3:0.5", iterations=6).invert_batch(0)
    compiled = make_inverter(tiny_loaded, schedule="3:0.5", iterations=6, compile=True).invert_batch(0)
    assert torch.equal(eager.keep, compiled.keep)
    torch.testing.assert_close(compiled.images, eager.images, rtol=1e-4, atol=1e-4)


def test_finite_terms_whose_sum_overflows_name_the_total(tiny_loaded):
    class Huge:
        def __call__(self, state):
            return {"a": state.logits.sum() * 0.0 + 3e38, "b": state.logits.sum() * 0.0 + 3e38}

    inverter = make_inverter(tiny_loaded, schedule="dense", iterations=2)
    inverter.losses[:] = [(type(inverter.losses[0][0])("huge"), Huge())]
    with pytest.raises(SmiError, match=r"loss term 'total' became inf at iteration 0"):
        inverter.invert_batch(0)
