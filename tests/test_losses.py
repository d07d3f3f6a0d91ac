"""The built-in losses: their maths on hand-checkable tensors, and each running dense and sparse."""

import math

import pytest
import torch
import torch.nn.functional as F

from smi_engine.errors import SmiError
from smi_engine.runs.events import EventBus
from smi_engine.inversion.losses import LossSpec, as_terms, attach_options, build_losses
from smi_engine.models import ModelSpec, load_model, save_model
from smi_plugins.cmi import MemoryBank, contrastive_loss, instance_features
from smi_plugins.deepinversion import bn_statistics_gap, js_divergence
from smi_plugins.psaq import differential_entropy, gaussian_kde, patch_similarity_entropy

from .conftest import TINY_ARGS, make_inverter

RGB_TINY = ModelSpec("vit_tiny_patch16_224", {**TINY_ARGS, "in_chans": 3})


# -- DeepInversion -------------------------------------------------------------------------------
def test_bn_gap_by_hand():
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = torch.tensor([[1.0, 3.0]])  # channel 0: mean 2, var 1
    x[:, 1] = 1.0  # channel 1: mean 1, var 0
    expected = math.sqrt((1 - 1) ** 2 + (4 - 0) ** 2) + math.sqrt((0 - 2) ** 2 + (1 - 1) ** 2)
    assert float(bn_statistics_gap(bn, x)) == pytest.approx(expected)


def test_js_divergence_is_zero_for_equal_outputs_and_symmetric():
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    assert float(js_divergence(a, a, 3.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(js_divergence(a, b, 3.0)) == pytest.approx(float(js_divergence(b, a, 3.0)))
    assert float(js_divergence(a, b, 3.0)) > 0


def test_deepinversion_terms_and_weights(tiny_loaded):
    events = []
    loss = LossSpec("deepinversion", 1.0, {"ce": 2.0, "tv_l2": 0.0, "l2": 0.5})
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), losses=[loss], iterations=1, jitter=0.0, flip=False)
    result = inverter.invert_batch(0)
    first = events[1]["losses"]
    assert set(first) == {"total", "deepinversion.ce", "deepinversion.l2"}  # zero weight: no term
    # at iteration 0 the image is the batch's starting noise: recompute the terms from it
    from smi_engine.inversion.batch import batch_generator

    generator = batch_generator(0, 0)
    noise = torch.randn(4, 1, 32, 32, generator=generator)
    ce = F.cross_entropy(tiny_loaded.model(noise), result.labels)
    assert first["deepinversion.ce"] == pytest.approx(2.0 * float(ce), rel=1e-5)
    assert first["deepinversion.l2"] == pytest.approx(0.5 * float(noise.norm()), rel=1e-5)
    assert first["total"] == pytest.approx(first["deepinversion.ce"] + first["deepinversion.l2"], rel=1e-6)


def test_bn_prior_runs_through_an_auxiliary_cnn_dense_and_sparse():
    loaded = load_model(RGB_TINY)
    options = {"bn": 0.01, "bn_model": "resnet18", "bn_pretrained": False}
    for schedule in ("dense", "2:0.5"):
        events = []
        inverter = make_inverter(loaded, bus=EventBus([events.append]), schedule=schedule, iterations=4,
                                 losses=[LossSpec("deepinversion", 1.0, options)])
        inverter.invert_batch(0)
        values = [e["losses"]["deepinversion.bn"] for e in events if e["event"] == "iteration"]
        assert len(values) == 4 and all(v > 0 and math.isfinite(v) for v in values)


def test_bn_prior_needs_batchnorm():
    loaded = load_model(RGB_TINY)
    with pytest.raises(SmiError, match="no BatchNorm2d"):
        make_inverter(loaded, losses=[LossSpec("deepinversion", 1.0, {"bn": 1.0, "bn_model": "vit_tiny_patch16_224", "bn_pretrained": False})])


def test_adversarial_term_competes_with_a_student(tmp_path, tiny_loaded):
    student = load_model(ModelSpec("vit_tiny_patch16_224", {**TINY_ARGS, "depth": 1}, mean=(0.5,), std=(0.5,)))
    save_model(tmp_path / "student", student)
    events = []
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule="2:0.5", iterations=4,
                             losses=[LossSpec("deepinversion", 1.0, {"adv": 1.0, "student": str(tmp_path / "student")})])
    inverter.invert_batch(0)
    adv = [e["losses"]["deepinversion.adv"] for e in events if e["event"] == "iteration"]
    assert all(v < 0 for v in adv)  # minus a positive divergence
    with pytest.raises(SmiError, match="needs a student"):
        make_inverter(tiny_loaded, losses=[LossSpec("deepinversion", 1.0, {"adv": 1.0})]).invert_batch(0)


# -- PSAQ-ViT ------------------------------------------------------------------------------------
def test_gaussian_kde_by_hand():
    h = 0.5
    samples = torch.tensor([[0.0, 1.0]])
    points = torch.tensor([[0.0, 0.5]])
    normal = lambda d: math.exp(-d * d / (2 * h * h)) / math.sqrt(2 * math.pi * h * h)  # noqa: E731
    expected = [(normal(0) + normal(1)) / 2, (normal(0.5) + normal(0.5)) / 2]
    torch.testing.assert_close(gaussian_kde(samples, points, h), torch.tensor([expected]))


def test_differential_entropy_of_a_uniform_density():
    # p = 1 on [0, 1]: -(p + 1e-4) log(p + 1e-4) integrates to about -1e-4
    points = torch.linspace(0, 1, 11).unsqueeze(0)
    value = differential_entropy(torch.ones(1, 11), points)
    assert float(value) == pytest.approx(-1.0001 * math.log(1.0001), rel=1e-3)  # float32


def test_patch_similarity_entropy_matches_psaq_reference():
    torch.manual_seed(0)
    tokens = torch.randn(2, 6, 4)
    # PSAQ-ViT's generate_data.py, written out: cosine sims, KDE on 10 points from min to max
    sims = F.cosine_similarity(tokens.unsqueeze(1), tokens.unsqueeze(2), dim=3).view(2, -1)
    x = torch.linspace(sims.min().item(), sims.max().item(), steps=10).repeat(2, 1)
    diffs = x.view(2, 10, 1) - sims.view(2, 1, -1)
    pdf = (torch.exp(-diffs.pow(2) / (2 * 0.01**2)) / math.sqrt(2 * math.pi * 0.01**2)).mean(-1) + 1e-4
    expected = torch.trapz(-pdf * torch.log(pdf), x, dim=-1).mean()
    torch.testing.assert_close(patch_similarity_entropy(tokens, 0.01, 10), expected)


def test_identical_patches_have_no_similarity_entropy():
    tokens = torch.ones(1, 5, 3)
    assert float(patch_similarity_entropy(tokens, 0.01, 10)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("schedule", ["dense", "2:0.5"])
def test_psaq_runs_on_dense_and_sparse_token_sets(tiny_loaded, schedule):
    events = []
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule=schedule, iterations=4,
                             losses=[LossSpec("deepinversion"), LossSpec("psaq", 0.5, {"blocks": "0,1"})])
    assert inverter.needs_attention_outputs
    inverter.invert_batch(0)
    values = [e["losses"]["psaq"] for e in events if e["event"] == "iteration"]
    assert len(values) == 4 and all(math.isfinite(v) for v in values)


# -- CMI -----------------------------------------------------------------------------------------
def test_contrastive_loss_by_hand():
    views = F.normalize(torch.eye(3), dim=1)
    # each local view matches only its own global view: at a low temperature the loss vanishes
    assert float(contrastive_loss(views, views, 0.01, current=3)) == pytest.approx(0.0, abs=1e-6)
    # identical views everywhere: a uniform guess among 3
    same = torch.ones(3, 3) / math.sqrt(3)
    assert float(contrastive_loss(same, same, 0.1, current=3)) == pytest.approx(math.log(3), rel=1e-5)
    # with bank rows, batch and bank are averaged separately
    local = torch.cat([views, same])
    expected = F.cross_entropy(local @ local.T / 0.5, torch.arange(6), reduction="none")
    assert float(contrastive_loss(local, local, 0.5, current=3)) == pytest.approx(float(expected[:3].mean() + expected[3:].mean()), rel=1e-5)


def test_memory_bank_is_a_ring_buffer():
    bank = MemoryBank(size=4, dim=1, device=torch.device("cpu"))
    bank.add(torch.arange(6, dtype=torch.float32).view(3, 2))
    bank.add(torch.arange(6, 12, dtype=torch.float32).view(3, 2))
    assert bank.count == 6
    assert bank.data[:, 0].tolist() == [8.0, 10.0, 4.0, 6.0]  # rows 5 and 6 overwrote rows 1 and 2
    assert len(bank.sample(10, torch.Generator().manual_seed(0))) == 4


def test_instance_features_average_patch_tokens_per_block():
    blocks = [torch.arange(12, dtype=torch.float32).view(1, 3, 4), torch.ones(1, 3, 4)]
    features = instance_features(blocks, prefix_tokens=1)
    assert features.tolist() == [[6.0, 7.0, 8.0, 9.0, 1.0, 1.0, 1.0, 1.0]]


@pytest.mark.parametrize("schedule", ["dense", "2:0.5"])
def test_cmi_runs_dense_and_sparse_and_fills_its_bank(tiny_loaded, schedule):
    events = []
    spec = LossSpec("cmi", 0.5, {"bank_size": 8, "negatives": 4})
    inverter = make_inverter(tiny_loaded, bus=EventBus([events.append]), schedule=schedule, iterations=3,
                             losses=[LossSpec("deepinversion"), spec])
    cmi = inverter.losses[1][1]
    head_before = [p.clone() for p in cmi.head.parameters()]
    inverter.invert_batch(0)
    inverter.invert_batch(1)  # the second batch contrasts against the first one's features
    assert cmi.bank.count == 8
    assert any(not torch.equal(a, b) for a, b in zip(head_before, cmi.head.parameters()))  # the head trained
    values = [e["losses"]["cmi"] for e in events if e["event"] == "iteration"]
    assert len(values) == 6 and all(math.isfinite(v) and v > 0 for v in values)


# -- the contract ----------------------------------------------------------------------------------
def test_loss_options_and_their_errors():
    specs = attach_options([LossSpec.parse("deepinversion"), LossSpec.parse("psaq:0.25")],
                           ["deepinversion.tv_l2=1e-3", "psaq.points=20"])
    assert specs[0].options == {"tv_l2": 1e-3} and specs[1] == LossSpec("psaq", 0.25, {"points": 20})
    with pytest.raises(SmiError, match="is for loss 'cmi', which this run does not use"):
        attach_options([LossSpec("psaq")], ["cmi.temperature=0.2"])
    with pytest.raises(SmiError, match="NAME.KEY=VALUE"):
        attach_options([LossSpec("psaq")], ["psaq"])
    with pytest.raises(SmiError, match="NAME or NAME:WEIGHT"):
        LossSpec.parse("psaq:lots")
    with pytest.raises(SmiError, match="no option 'bandwith'.*bandwidth"):
        build_losses([LossSpec("psaq", 1.0, {"bandwith": 0.1})])
    with pytest.raises(SmiError, match="rejected its options"):
        build_losses([LossSpec("cmi", 1.0, {"temperature": -1})])


def test_loss_results_become_named_scalar_terms():
    assert list(as_terms("x", torch.tensor(1.0))) == ["x"]
    assert list(as_terms("x", {"a": torch.tensor([2.0])})) == ["x.a"]
    with pytest.raises(SmiError, match="not a scalar"):
        as_terms("x", {"a": torch.ones(3)})
    with pytest.raises(SmiError, match="returns a scalar tensor or a dict"):
        as_terms("x", 1.0)


def test_deepinversion_factory_rejects_unknown_option():
    with pytest.raises(SmiError, match="has no option 'tv'"):
        build_losses([LossSpec("deepinversion", 1.0, {"tv": 1})])


def test_a_non_finite_loss_stops_the_run_with_a_named_term(tiny_loaded):
    class Explodes:
        def __call__(self, state):
            return state.logits.sum() * float("inf")

    inverter = make_inverter(tiny_loaded)
    inverter.losses.append((LossSpec("explodes"), Explodes()))
    with pytest.raises(SmiError, match="'explodes' became"):
        inverter.invert_batch(0)
