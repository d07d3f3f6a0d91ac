"""Post-training quantisation: the quantisers, calibration sources, sparse feeding, save/reload."""

import json

import pytest
import torch

from smi_engine.calibration import Batch, ModelFeeder
from smi_engine.errors import SmiError
from smi_engine.inversion.run import run_inversion
from smi_engine.inversion.config import InversionConfig
from smi_engine.models import ModelSpec, load_model
from smi_engine.quantization.scheme import QuantConfig, finish_calibration, quantize_model, quantizers
from smi_engine.downstream.quantize import QuantizeJob, run_quantization
from smi_engine.quantization.layers import QuantAttention, QuantLinear
from smi_engine.quantization.quantizers import ActivationQuantizer, quantize_activation, quantize_weight

from .conftest import smi


def test_weight_quantisation_is_per_channel_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.01, 0.02, -0.04]])
    q = quantize_weight(w, 4)
    # 4 bits: scale = max|w| / 7.5 per row; levels -8..7
    for row, reach in ((0, 1.0), (1, 0.04)):
        scale = reach / 7.5
        levels = q[row] / scale
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        assert levels.min() >= -8 and levels.max() <= 7
    assert float((q - w).abs().max()) <= 1.0 / 7.5 / 2 + 1e-6


def test_activation_quantisation_is_asymmetric_with_a_zero_point():
    low, high = torch.tensor(-1.0), torch.tensor(3.0)
    x = torch.linspace(-2, 4, 101)
    q = quantize_activation(x, low, high, 2)  # 4 levels: scale 4/3, zero point 1
    assert sorted(set(q.tolist())) == pytest.approx([-4 / 3, 0.0, 4 / 3, 8 / 3])
    assert float(quantize_activation(torch.tensor(0.0), low, high, 8)) == 0.0  # zero is exact


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse", "search"])
def test_calibrators_choose_ranges(calibrator):
    torch.manual_seed(0)
    values = torch.cat([torch.randn(10000), torch.tensor([40.0])])  # one outlier
    quantizer = ActivationQuantizer(4, calibrator, 99.9)
    quantizer(values[:5000])
    quantizer(values[5000:])
    quantizer.finish()
    if calibrator == "minmax":
        assert float(quantizer.high) == 40.0
    else:  # the outlier is clipped away, and the quantisation error drops
        assert float(quantizer.high) < 10.0
    assert not quantizer.calibrating
    error = (quantizer(values) - values).pow(2).mean()
    minmax_error = (quantize_activation(values, values.min(), values.max(), 4) - values).pow(2).mean()
    assert error <= minmax_error + 1e-6


def test_quantised_model_swaps_every_linear_and_attention(tiny_loaded):
    qmodel = quantize_model(tiny_loaded.model, QuantConfig(8, 8))
    assert all(type(m) is not torch.nn.Linear for m in qmodel.modules() if not isinstance(m, QuantLinear) and m not in [q.layer for q in qmodel.modules() if isinstance(q, QuantLinear)])
    assert sum(isinstance(m, QuantAttention) for m in qmodel.modules()) == 2
    # 2 blocks x (qkv, proj, fc1, fc2 inputs + q, k, probs, v) + patch embedding + head
    assert len(quantizers(qmodel)) == 2 * 8 + 2
    assert tiny_loaded.model.blocks[0].attn.__class__.__name__ == "Attention"  # the original is untouched


def test_w8a8_predicts_like_full_precision(digits_teacher):
    from smi_engine.data import ModelInput, load_data, loader

    loaded = load_model(ModelSpec.from_dir(digits_teacher))
    qmodel = quantize_model(loaded.model, QuantConfig(8, 8))
    batches = loader(load_data("digits").val, ModelInput.for_model(loaded.model, loaded.normalizer), 128)
    images = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        qmodel(images[:32])
    finish_calibration(qmodel, QuantConfig(8, 8))
    with torch.no_grad():
        agree = (qmodel(images).argmax(1) == loaded.model(images).argmax(1)).float().mean()
    assert float(agree) > 0.95
    with pytest.raises(SmiError, match="outside 2..16"):
        quantize_model(loaded.model, QuantConfig(1, 8))


def test_sparse_pool_images_are_fed_as_sparse_tokens(tmp_path, tiny_loaded):
    """Observers see only the kept patches of sparse calibration images."""
    qmodel = quantize_model(tiny_loaded.model, QuantConfig(8, 8))
    feeder = ModelFeeder(qmodel, tiny_loaded.normalizer)
    images = torch.zeros(2, 1, 32, 32)
    images[:, :, :4, :4] = 0.9  # only the kept patch is bright
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    keep[:, 0, 0] = True
    with torch.no_grad():
        feeder(Batch(images, keep), tiny_loaded.normalizer)
    embed = qmodel.patch_embed.proj.input_quantizer
    assert float(embed.low) == pytest.approx(0.9) and float(embed.high) == pytest.approx(0.9)


def test_a_model_that_cannot_drop_tokens_gets_blanked_pixels(tiny_loaded):
    import timm

    cnn = timm.create_model("resnet18", in_chans=1, num_classes=10).eval()
    seen = []
    cnn.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    feeder = ModelFeeder(cnn, tiny_loaded.normalizer)
    images = torch.full((1, 1, 32, 32), 0.7)
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[0, 0, 0] = True
    with torch.no_grad():
        feeder(Batch(images, keep), tiny_loaded.normalizer)
    x = seen[0]
    assert x.shape[-1] == 224  # resized to the CNN's input
    assert float(x[0, 0, 0, 0]) == pytest.approx(0.7, abs=1e-5)  # the kept patch
    assert float(x[0, 0, 200, 200]) == pytest.approx(0.0, abs=1e-6)  # a stopped one: the normaliser's zero


def test_quantize_job_calibrates_on_a_sparse_pool_and_reloads(tmp_path, digits_teacher):
    pool = tmp_path / "pool-run"
    run_inversion(InversionConfig(ModelSpec.from_dir(digits_teacher), schedule="5:0.5", iterations=10, batch_size=16,
                                  checkpoint_every=0, flip=False), pool, device="cpu")
    job = QuantizeJob(ModelSpec.from_dir(digits_teacher), str(pool), "digits", QuantConfig(8, 8, "minmax"), calib_size=16)
    result = run_quantization(job, torch.device("cpu"), out=tmp_path / "q")
    assert result["calib_images"] == 16 and result["calib_kept_fraction"] == pytest.approx(0.5)
    assert abs(result["top1"] - result["fp32_top1"]) < 5 and result["fp32_top1"] > 50  # W8A8 keeps what fp32 knows
    reloaded = load_model(ModelSpec.from_dir(tmp_path / "q"))
    assert isinstance(reloaded.model.head, QuantLinear) and not quantizers(reloaded.model)[0].calibrating
    card = json.loads((tmp_path / "q" / "smi-model.json").read_text())
    assert card["quantization"]["w_bit"] == 8 and card["quantized_top1"] == result["top1"]
    with pytest.raises(SmiError, match="--calib-size is 99"):
        run_quantization(QuantizeJob(job.model, str(pool), "digits", calib_size=99), torch.device("cpu"))
    with pytest.raises(SmiError, match="neither noise"):
        run_quantization(QuantizeJob(job.model, str(tmp_path / "nowhere"), "digits"), torch.device("cpu"))


def test_quantize_cli_prints_json_and_keeps_a_run_directory(tmp_path, digits_teacher):
    out = tmp_path / "w4a8"
    proc = smi("quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits", "--w-bit", "4",
               "--a-bit", "8", "--calibrator", "percentile", "--out", out, "--json", "--device", "cpu", check=True)
    result = json.loads(proc.stdout)
    assert {"top1", "top5", "fp32_top1", "fp32_top5", "w_bit", "a_bit", "calib"} <= set(result)
    assert (result["w_bit"], result["a_bit"], result["calib"]) == (4, 8, "noise")
    assert json.loads((out / "summary.json").read_text())["top1"] == result["top1"]
    # progress with true totals, as plain lines (stderr is a pipe here): calibration, then both evaluations
    phases = [line.split(" ")[0:2] for line in proc.stderr.splitlines()]
    assert ["calibrate", "32/32"] in phases and ["eval", "fp32"] in phases and ["eval", "W4A8"] in phases
    listed = json.loads(smi("runs", tmp_path, "--json", check=True).stdout)
    assert [(r["kind"], r["status"], r["schedule"]) for r in listed] == [("quantize", "finished", "matmul W4A8")]
    assert listed[0]["result"]["top1"] == result["top1"]
    text = smi("quantize", "--teacher", digits_teacher, "--calib", "noise", "--data", "digits", "--limit", "64",
               "--device", "cpu", check=True)
    assert "W8A8" in text.stdout and "fp32 top-1" in text.stdout
    generic = smi("task", "quantize", "-o", f"teacher_dir={digits_teacher}", "-o", "calib=real:digits", "-o", "data=digits",
                  "-o", "limit=64", "--device", "cpu", check=True)
    assert json.loads(generic.stdout)["eval_images"] == 64


def test_the_quantize_task_takes_every_reconstruction_flag(tmp_path, digits_teacher):
    """`smi task quantize -o recon_X=V` is `smi quantize --recon-X V`: the same recorded
    reconstruction settings and, deterministic on CPU, the same top-1."""
    flags = {"recon_iters": "3", "recon_lr": "0.02", "recon_step_lr": "0", "recon_drop": "0.25", "recon_p": "2.5"}
    job = {"calib": "real:digits", "calib_size": "8", "data": "digits", "limit": "64", "scheme": "repq",
           "w_bit": "4", "a_bit": "4", "reconstruct": "block", **flags}
    cli = smi("quantize", "--teacher", digits_teacher, *[a for k, v in job.items() for a in (f"--{k.replace('_', '-')}", v)],
              "--json", "--device", "cpu", "--out", tmp_path / "cli", check=True)
    task = smi("task", "quantize", "-o", f"teacher_dir={digits_teacher}", *[a for k, v in job.items() for a in ("-o", f"{k}={v}")],
               "--device", "cpu", "--out", tmp_path / "task", check=True)
    recorded = [json.loads((tmp_path / run / "config.json").read_text())["config"]["reconstruct"] for run in ("cli", "task")]
    assert recorded[0] == recorded[1] == {"mode": "block", "iterations": 3, "rounding_lr": 0.02, "step_lr": 0.0,
                                          "drop": 0.25, "p": 2.5}
    assert json.loads(task.stdout)["top1"] == json.loads(cli.stdout)["top1"]
