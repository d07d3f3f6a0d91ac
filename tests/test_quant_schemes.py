"""Quantisation schemes: the seed's positions and sparse path, RepQ-ViT's fold and log softmax grids,
saving and reloading, the plugin hook and the CLI."""

import copy
import json
import re
from dataclasses import replace

import pytest
import torch

from smi_engine.calibration import Batch, ModelFeeder
from smi_engine.errors import SmiError
from smi_engine.models import ModelSpec, load_model
from smi_engine.plugins import get_registry
from smi_engine.quantization.scheme import QuantConfig, finish_calibration, prepare_calibration, quantize_model, quantizers
from smi_engine.downstream.quantize import QuantizeJob, run_quantization
from smi_engine.quantization.layers import QuantAttention, QuantLinear
from smi_engine.quantization.quantizers import AdaptiveLogQuantizer, LogQuantizer, qdrop, quantize_activation, quantize_log
from smi_engine.quantization.repq import post_norm_pairs, fold_channel_ranges
from smi_engine.quantization.seed import SeedBlockQuantizers

from .conftest import assert_one_line_error, smi, tiny_model

SEED_POSITIONS = ["image", "patches", "tokens", "position", "embedded"] + [
    f"blocks.{i}.{name}" for i in range(2) for name in SeedBlockQuantizers.NAMES] + ["features", "logits"]


def _calibrate(qmodel, config, images, keep=None, normalizer=None):
    feeder = ModelFeeder(qmodel, normalizer)
    with torch.no_grad():
        feeder(Batch(images, keep), normalizer)
    finish_calibration(qmodel, config)
    return qmodel


def test_seed_scheme_quantises_the_seeds_27_positions_in_order(tiny_loaded):
    qmodel = quantize_model(tiny_loaded.model, QuantConfig(8, 8, scheme="seed"))
    names = [name for name, module in qmodel.named_modules() if module in quantizers(qmodel)]
    assert names == SEED_POSITIONS and len(names) == 27
    assert qmodel.num_classes == 10 and qmodel.patch_embed is qmodel.model.patch_embed
    # every linear layer (patch embedding, qkv, proj, fc1, fc2, head) quantises its weight only
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 1 + 2 * 4 + 1 and all(m.input_quantizer is None for m in linears)


def test_seed_scheme_calibrates_sparse_images_the_seeds_way(tiny_loaded):
    """Stopped patches reach the input and embedding quantisers as the normaliser's zero; the
    blocks see only the prefix token and the kept patches."""
    config = QuantConfig(8, 8, scheme="seed")
    qmodel = quantize_model(tiny_loaded.model, config)
    images = torch.full((2, 1, 32, 32), -0.5)
    images[:, :, :4, :8] = 0.9  # patches (0, 0) and (0, 1) are kept, bright
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    keep[:, 0, :2] = True
    seen = []
    qmodel.blocks[0].norm1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    _calibrate(qmodel, config, images, keep, tiny_loaded.normalizer)
    assert (float(qmodel.image.low), float(qmodel.image.high)) == pytest.approx((0.0, 0.9))  # -0.5 was blanked
    assert seen == [1 + 2]
    # the same images dense: the blocks see all 64 patches and the input range includes -0.5
    dense = _calibrate(quantize_model(tiny_loaded.model, config), config, images, None, tiny_loaded.normalizer)
    assert float(dense.image.low) == pytest.approx(-0.5)


@pytest.mark.parametrize("variant", [dict(reg_tokens=2, no_embed_class=True), dict(), "distilled"])
def test_seed_scheme_equals_the_float_model_at_16_bits(variant):
    model = tiny_model("deit_tiny_distilled_patch16_224") if variant == "distilled" else tiny_model(**variant)
    config = QuantConfig(16, 16, scheme="seed")
    qmodel = quantize_model(model, config)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        qmodel(images)
        finish_calibration(qmodel, config)
        torch.testing.assert_close(qmodel(images), model(images), atol=2e-3, rtol=0)


def test_log_sqrt2_levels():
    delta = torch.tensor(1.0)
    x = torch.tensor([1.0, 0.75, 2 ** -0.5, 0.5, 0.3, 1e-6, 0.0])
    q = quantize_log(x, delta, 0.5, 3)  # 8 levels: 2^0, 2^-0.5, ..., 2^-3.5
    assert q[0] == 1.0 and q[3] == pytest.approx(0.5) and q[2] == pytest.approx(2 ** -0.5)
    assert q[1] == pytest.approx(2 ** -0.5)  # log2(0.75) * 2 = -0.83 -> level 1
    assert q[4] == pytest.approx(2 ** -1.5)  # -2 log2(0.3) = 3.47 -> level 3
    assert q[5] == 0 and q[6] == 0  # below the smallest level
    assert torch.equal(x, torch.tensor([1.0, 0.75, 2 ** -0.5, 0.5, 0.3, 1e-6, 0.0]))  # computed in place, not on x
    observer = LogQuantizer(4, "minmax")
    probs = torch.rand(64, 16).softmax(dim=-1)
    observer(probs)
    observer.finish()
    assert 0 < float(observer.high) <= float(probs.max()) + 1e-6
    assert float((observer(probs) - probs).abs().max()) < float(probs.max()) / 2


def test_log_grid_of_a_wider_base():
    x = torch.tensor([1.0, 0.5, 0.3, 2 ** -7, 2 ** -8.6])
    assert quantize_log(x, torch.tensor(1.0), 1.0, 3).tolist() == [1.0, 0.5, 0.25, 2 ** -7, 0.0]  # base 2: 1 .. 2^-7


def _attention(rows: int, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax rows of a peaked attention, and the values (mean 0.5) they multiply."""
    probs = (torch.randn(rows, 4, tokens, tokens, generator=generator) * 2).softmax(dim=-1)
    return probs, torch.randn(rows, 4, tokens, 16, generator=generator) + 0.5


def _product_error(quantizer, probs, values) -> float:
    if hasattr(quantizer, "observe_product"):
        quantizer.observe_product(probs, values)
    quantizer(probs)
    quantizer.finish()
    return float((quantizer(probs) @ values - probs @ values).pow(2).mean() / (probs @ values).pow(2).mean())


def test_adaptive_log_base_widens_at_3_bits_where_sqrt2_loses_the_small_probabilities():
    """Of a 65-token row, base sqrt(2)'s eight 3-bit levels zero most probabilities; AdaLog's
    searched base spans them, and what they compute (probs @ v) keeps several times less error
    (measured: 0.019 against 0.100). With more levels the search may narrow the base; it never
    does worse than sqrt(2) here (4 bits: 0.0062 both; 8 bits: 0.0015 against 0.0050)."""
    probs, values = _attention(16, 65, torch.Generator().manual_seed(0))
    adaptive = AdaptiveLogQuantizer(3, "search")
    assert _product_error(adaptive, probs, values) < _product_error(LogQuantizer(3, "search"), probs, values) / 3
    assert float(adaptive.exponent) > 0.7  # a base of more than 2^0.7
    for bits in (4, 8):
        searched = _product_error(AdaptiveLogQuantizer(bits, "search"), probs, values)
        assert searched < 1.05 * _product_error(LogQuantizer(bits, "search"), probs, values)


def test_adaptive_log_quantiser_needs_the_values_its_attention_multiplies():
    quantizer = AdaptiveLogQuantizer(3, "search")
    quantizer(torch.rand(4, 8).softmax(dim=-1))
    with pytest.raises(SmiError, match="saw no attention values: its attention must call observe_product"):
        quantizer.finish()


def test_qdrop_picks_each_value_exactly_from_one_side_and_passes_gradients_to_both():
    quantized = torch.randn(4000, requires_grad=True)
    float_values = torch.randn(4000, requires_grad=True)
    torch.manual_seed(0)
    mixed = qdrop(quantized, float_values, 0.3)
    from_float = mixed == float_values
    assert torch.equal(from_float, mixed != quantized)  # every value is exactly one side's
    assert 0.25 < float(from_float.float().mean()) < 0.35
    mixed.sum().backward()
    assert torch.equal(float_values.grad, from_float.float()) and torch.equal(quantized.grad, (~from_float).float())
    assert torch.equal(qdrop(quantized, float_values, 0.0), quantized)
    assert torch.equal(qdrop(quantized, float_values, 1.0), float_values)


def test_repq_fold_keeps_the_float_model_and_turns_per_channel_into_per_tensor(tiny_loaded):
    """Folding the per-channel ranges into LayerNorm and the next layer changes nothing in float,
    and the per-tensor quantiser after the fold equals per-channel quantisation before it."""
    config = QuantConfig(4, 4, "minmax", scheme="repq")
    qmodel = quantize_model(tiny_loaded.model, config)
    images = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        qmodel(images)
    for quantizer in quantizers(qmodel):
        quantizer.finish()
    norm, linear = post_norm_pairs(qmodel)[0]
    quantizer = linear.input_quantizer
    assert quantizer.channel_low.shape == (48,)
    tokens = torch.randn(8, 5, 48)
    before = norm(tokens)
    per_channel = linear.layer(quantize_activation(before, quantizer.channel_low, quantizer.channel_high, 4))
    float_before = linear.layer(before)
    fold_channel_ranges(norm, linear)
    after = norm(tokens)
    torch.testing.assert_close(linear.layer(after), float_before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear(after), per_channel, atol=1e-4, rtol=1e-4)
    scale = (quantizer.high - quantizer.low) / 15
    assert float(-quantizer.low / scale) == pytest.approx(round(float(-quantizer.low / scale)), abs=1e-4)


def test_repq_positions_and_bits(tiny_loaded):
    qmodel = quantize_model(tiny_loaded.model, QuantConfig(3, 3, scheme="repq"))
    assert len(quantizers(qmodel)) == 2 * 8 + 2
    assert sum(isinstance(q, LogQuantizer) for q in quantizers(qmodel)) == 2
    assert qmodel.patch_embed.proj.input_quantizer.bits == 8  # the image stays at 8 bits
    assert sum(q.per_channel for q in quantizers(qmodel)) == 2 * 2  # qkv and fc1 inputs


def test_repq_options_ablate_its_ideas_one_by_one(tiny_loaded):
    """--scheme-option repq.KEY=VALUE reaches the scheme's factory, typed: each option turns one
    of RepQ-ViT's ideas off, and the rest of the scheme stays as it was."""
    def built(**options):
        return quantize_model(tiny_loaded.model, QuantConfig(3, 3, scheme="repq", scheme_options=options))

    plain = built(reparameterize=False)
    assert sum(q.per_channel for q in quantizers(plain)) == 0  # no per-channel ranges to fold
    assert sum(isinstance(q, LogQuantizer) for q in quantizers(plain)) == 2
    uniform = built(softmax="uniform")
    assert sum(isinstance(q, LogQuantizer) for q in quantizers(uniform)) == 0
    assert sum(q.per_channel for q in quantizers(uniform)) == 2 * 2
    adaptive = built(softmax="adaptive-log")
    assert sum(isinstance(q, AdaptiveLogQuantizer) for q in quantizers(adaptive)) == 2
    assert built(image_bits="6").patch_embed.proj.input_quantizer.bits == 6
    images = torch.randn(8, 1, 32, 32)
    norms = [block.norm1.weight.clone() for block in plain.blocks]
    _calibrate(plain, QuantConfig(3, 3, "minmax", scheme="repq", scheme_options={"reparameterize": False}), images)
    assert all(torch.equal(block.norm1.weight, w) for block, w in zip(plain.blocks, norms))  # nothing folded
    with pytest.raises(SmiError, match="scheme 'repq' option reparameterize=maybe is not true or false"):
        built(reparameterize="maybe")
    with pytest.raises(SmiError, match="repq.softmax=log2 is not a softmax grid: pass repq.softmax=log-sqrt2 or "):
        built(softmax="log2")


def _qkv_reach(qmodel, images) -> list[torch.Tensor]:
    """Each attention's largest |q|, |k|, |v| per channel on ``images``, as (3, C)."""
    reach = []
    def seen(_module, _inputs, out):
        reach.append(out.abs().flatten(0, 1).amax(0).view(3, -1))

    hooks = [m.inner.qkv.register_forward_hook(seen) for m in qmodel.modules() if isinstance(m, QuantAttention)]
    qmodel(images)
    for hook in hooks:
        hook.remove()
    return reach


@pytest.mark.parametrize("balance", ["qk", "qkv"])
def test_repq_balance_equalises_channels_and_the_float_model_computes_the_same(tiny_loaded, balance):
    """repq.balance rescales the float weights before calibration: on the images it watched, q
    and k reach the same value in every channel (and v one value in all, with qkv), while the
    model's output does not change."""
    config = QuantConfig(4, 4, scheme="repq", scheme_options={"balance": balance})
    qmodel = quantize_model(tiny_loaded.model, config)
    images = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        before, unbalanced = qmodel(images), _qkv_reach(qmodel, images)  # still calibrating: float
        prepare_calibration(qmodel, config, lambda: qmodel(images))
        torch.testing.assert_close(qmodel(images), before, atol=1e-5, rtol=1e-5)
        for (q, k, v), (q0, k0, v0) in zip(_qkv_reach(qmodel, images), unbalanced):
            torch.testing.assert_close(q, k)
            torch.testing.assert_close(q * k, q0 * k0)
            assert float(q.max() / q.min()) < float((q0.max() / q0.min()).maximum(k0.max() / k0.min()))
            if balance == "qkv":
                torch.testing.assert_close(v, torch.full_like(v, float(v[0])))
            else:
                torch.testing.assert_close(v, v0)


def test_repq_balance_leaves_an_attention_the_forward_never_calls_as_it_was(tiny_loaded):
    model = copy.deepcopy(tiny_loaded.model)
    model.spare = copy.deepcopy(model.blocks[0].attn)  # quantised like the others, never run
    config = QuantConfig(4, 4, scheme="repq", scheme_options={"balance": "qkv"})
    qmodel = quantize_model(model, config)
    spare, used = qmodel.spare.inner.qkv.layer.weight.clone(), qmodel.blocks[0].attn.inner.qkv.layer.weight.clone()
    with torch.no_grad():
        prepare_calibration(qmodel, config, lambda: qmodel(torch.randn(4, 1, 32, 32)))
    assert torch.equal(qmodel.spare.inner.qkv.layer.weight, spare)
    assert not torch.equal(qmodel.blocks[0].attn.inner.qkv.layer.weight, used)


def test_repq_balance_is_refused_where_it_would_change_the_model():
    model = tiny_model(qk_norm=True)
    refused = r"repq.balance=qk needs attention without q/k normalisation .* pass repq.balance=none"
    with pytest.raises(SmiError, match=refused):
        quantize_model(model, QuantConfig(4, 4, scheme="repq", scheme_options={"balance": "qk"}))
    with pytest.raises(SmiError, match="repq.balance=kv is not a balancing: pass repq.balance=none or qk or qkv"):
        quantize_model(model, QuantConfig(4, 4, scheme="repq", scheme_options={"balance": "kv"}))


def test_scheme_options_are_recorded_and_a_saved_model_rebuilds_with_them(tmp_path, digits_teacher):
    out = tmp_path / "q"
    proc = smi("quantize", "--teacher", digits_teacher, "--calib", "real:digits", "--data", "digits", "--scheme", "repq",
               "--scheme-option", "repq.reparameterize=false", "--scheme-option", "repq.softmax=adaptive-log",
               "--scheme-option", "repq.balance=qkv", "--w-bit", "4", "--a-bit", "3", "--limit", "128", "--json",
               "--device", "cpu", "--out", out, check=True)
    result = json.loads(proc.stdout)
    options = {"reparameterize": False, "softmax": "adaptive-log", "balance": "qkv"}
    assert result["scheme_options"] == options
    assert json.loads((out / "smi-model.json").read_text())["quantization"]["scheme_options"] == options
    shown = json.loads(smi("eval", "--teacher", out, "--data", "digits", "--limit", "128", "--json", "--device", "cpu",
                           check=True).stdout)
    assert shown["top1"] == result["top1"]  # the reloaded model is the ablated one, not repq's default
    again = smi("quantize", "--config", out / "config.json", "--out", tmp_path / "again", "--json", "--device", "cpu",
                check=True)
    assert json.loads(again.stdout)["top1"] == result["top1"]
    reloaded = load_model(ModelSpec.from_dir(out)).model
    softmax = [q for q in quantizers(reloaded) if isinstance(q, AdaptiveLogQuantizer)]  # rebuilt as saved
    assert len(softmax) == 2 and all(float(q.exponent) != AdaptiveLogQuantizer.EXPONENT for q in softmax)  # its searched base


@pytest.mark.parametrize("scheme", ["seed", "repq", "matmul"])
def test_a_saved_model_of_every_scheme_reloads_to_the_same_outputs(tmp_path, digits_teacher, scheme):
    job = QuantizeJob(ModelSpec.from_dir(digits_teacher), "real:digits", "digits", QuantConfig(4, 4, scheme=scheme),
                      calib_size=32, limit=128)
    result = run_quantization(job, torch.device("cpu"), out=tmp_path / "q")
    assert result["scheme"] == scheme and result["calibrator"] == ("search" if scheme == "repq" else "minmax")
    reloaded = load_model(ModelSpec.from_dir(tmp_path / "q"))
    card = json.loads((tmp_path / "q" / "smi-model.json").read_text())
    assert card["quantization"]["scheme"] == scheme
    original = load_model(ModelSpec.from_dir(digits_teacher))
    images = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(reloaded.model(images), original.model(images), atol=1e-3)  # it is quantised
        requantised = run_quantization(job, torch.device("cpu"))
    assert requantised["top1"] == result["top1"]


@pytest.mark.parametrize("record, message", [
    ({"w_bit": 4, "a_bit": 4, "colour": "red"}, "quantization record is malformed"),
    ({"w_bit": 4, "a_bit": 4, "scheme": "gone"}, "quantised by scheme 'gone', which no installed plugin registers"),
    ({"w_bit": 4, "a_bit": 4, "scheme": ["matmul"]}, "quantised by scheme \"['matmul']\""),
])
def test_a_saved_model_whose_quantisation_cannot_be_rebuilt_is_named(tmp_path, digits_teacher, record, message):
    folder = tmp_path / "q"
    folder.mkdir()
    for name in ("smi-model.json", "model.safetensors"):
        (folder / name).write_bytes((digits_teacher / name).read_bytes())
    card = json.loads((folder / "smi-model.json").read_text())
    (folder / "smi-model.json").write_text(json.dumps({**card, "quantization": record}))
    with pytest.raises(SmiError, match=re.escape(message)):
        load_model(ModelSpec.from_dir(folder))


def test_schemes_are_plugins_and_unknown_ones_are_named(tiny_loaded):
    registry = get_registry()
    assert registry.plugins["quant_schemes"].registers["schemes"] == ["matmul", "seed", "repq"]
    with pytest.raises(SmiError, match="unknown quantisation scheme 'bogus'.*matmul, repq, seed"):
        quantize_model(tiny_loaded.model, QuantConfig(8, 8, scheme="bogus"))
    with pytest.raises(SmiError, match="--w-bit 1 is outside"):
        quantize_model(tiny_loaded.model, QuantConfig(1, 8, scheme="seed"))


def test_quantize_cli_scheme_option(tmp_path, digits_teacher):
    """--scheme picks the scheme that quantises: the saved model has the seed scheme's quantisers
    (not matmul's), and scores what the same job run in-process scores."""
    out = tmp_path / "q"
    proc = smi("quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits", "--scheme", "seed",
               "--w-bit", "4", "--a-bit", "4", "--limit", "64", "--json", "--device", "cpu", "--out", out, check=True)
    teacher = load_model(ModelSpec.from_dir(digits_teacher)).model
    keys = {scheme: set(quantize_model(teacher, QuantConfig(4, 4, scheme=scheme)).state_dict()) for scheme in ("seed", "matmul")}
    assert keys["seed"] != keys["matmul"]
    assert set(load_model(ModelSpec.from_dir(out)).model.state_dict()) == keys["seed"]
    job = QuantizeJob(ModelSpec.from_dir(digits_teacher), "noise", "digits", QuantConfig(4, 4, scheme="seed"), limit=64)
    assert json.loads(proc.stdout)["top1"] == run_quantization(job, torch.device("cpu"))["top1"]
    assert_one_line_error(smi("quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits",
                              "--scheme", "nope", "--device", "cpu"), "unknown quantisation scheme 'nope'")
    listed = json.loads(smi("plugins", "--json", check=True).stdout)
    assert next(p for p in listed if p["name"] == "quant_schemes")["schemes"] == ["matmul", "seed", "repq"]


def test_a_scheme_is_built_once_per_job_and_keeps_its_state(digits_teacher, monkeypatch):
    """The job asks `finish` of the very object that built the model, so a scheme may carry
    state from `build` to `finish` (before: a fresh scheme object at every step)."""
    from smi_engine.plugins import Registration
    from smi_engine.quantization.matmul import MatmulScheme

    made = []

    class Stateful(MatmulScheme):
        def __init__(self):
            super().__init__()
            self.built = None
            made.append(self)

        def build(self, model, config):
            self.built = super().build(model, config)
            return self.built

        def finish(self, qmodel, config):
            assert qmodel is self.built, "finish asked of another scheme object than the one that built"
            super().finish(qmodel, config)

    monkeypatch.setitem(get_registry().entries["schemes"], "stateful", Registration("stateful", Stateful, "test"))
    job = QuantizeJob(ModelSpec.from_dir(digits_teacher), "noise", "digits", QuantConfig(4, 4, scheme="stateful"),
                      calib_size=8, limit=32)
    result = run_quantization(job, torch.device("cpu"))
    assert len(made) == 1 and made[0].built is not None
    matmul = run_quantization(replace(job, quant=QuantConfig(4, 4, scheme="matmul")), torch.device("cpu"))
    assert result["top1"] == matmul["top1"]  # the same quantisation, only remembered
