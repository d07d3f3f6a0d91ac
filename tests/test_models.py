"""Model loading: timm names, kwargs, checkpoints read without running pickled code."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from smi_engine.errors import SmiError
from smi_engine.models import (
    ModelSpec, create_model, load_model, model_input_size, parse_floats, parse_model_args, read_state_dict, save_model,
)

from .conftest import TINY_ARGS, tiny_spec


def test_model_args_are_python_literals():
    assert parse_model_args("img_size=32,patch_size=4,qkv_bias=False,drop_rate=0.1,act_layer=gelu") == {
        "img_size": 32, "patch_size": 4, "qkv_bias": False, "drop_rate": 0.1, "act_layer": "gelu"}
    assert parse_model_args("img_size=(32, 48),patch_size=4") == {"img_size": (32, 48), "patch_size": 4}
    assert parse_model_args("") == {}
    with pytest.raises(SmiError, match="KEY=VALUE"):
        parse_model_args("img_size")


def test_floats():
    assert parse_floats("0.5") == (0.5,) and parse_floats("1,2,3") == (1.0, 2.0, 3.0)
    with pytest.raises(SmiError, match="comma-separated"):
        parse_floats("a,b")


def test_unknown_model_suggests_close_names():
    with pytest.raises(SmiError, match="did you mean.*deit_tiny_patch16_224"):
        create_model(ModelSpec("deit_tiny_patch16_244"))


def test_bad_kwargs_are_named():
    with pytest.raises(SmiError, match="bad --model-args"):
        create_model(ModelSpec("vit_tiny_patch16_224", {"colour": 3}))


def test_input_size_comes_from_the_built_model_not_the_pretrained_config():
    model = create_model(tiny_spec())
    assert model_input_size(model) == (1, 32, 32)
    assert model_input_size(timm.create_model("resnet18", in_chans=1)) == (1, 224, 224)


def test_normaliser_defaults_follow_timm_and_fit_grey_models():
    rgb = load_model(ModelSpec("vit_tiny_patch16_224", {**TINY_ARGS, "in_chans": 3}))
    assert rgb.normalizer.mean == pytest.approx(timm.data.IMAGENET_INCEPTION_MEAN)
    grey = load_model(ModelSpec("vit_tiny_patch16_224", TINY_ARGS))
    assert len(grey.normalizer.mean) == 1 and grey.normalizer.mean[0] == pytest.approx(0.5)
    with pytest.raises(SmiError, match="one value per channel"):
        load_model(ModelSpec("vit_tiny_patch16_224", TINY_ARGS, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module-prefix"])
def test_pth_checkpoints_load_with_weights_only(tmp_path, wrap):
    source = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS)
    state = source.state_dict()
    if wrap == "module-prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap != "plain":
        state = {wrap: state}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    loaded = load_model(ModelSpec("vit_tiny_patch16_224", TINY_ARGS, checkpoint=str(path)))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), source.eval()(x))


def test_safetensors_checkpoint(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec("vit_tiny_patch16_224", TINY_ARGS, checkpoint=str(path)))
    torch.testing.assert_close(loaded.model.pos_embed, source.pos_embed)


class _Payload:
    """Unpickling this would create a file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    with pytest.raises(SmiError, match="cannot read checkpoint .*pickled Python objects, which smi never loads") as caught:
        read_state_dict(path)
    assert "weights_only" not in str(caught.value)  # never suggest unsafe loading
    assert not marker.exists()


def test_corrupt_and_missing_checkpoints(tmp_path):
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"\x80\x04not really a checkpoint")
    with pytest.raises(SmiError, match="cannot read checkpoint .*broken.pth"):
        read_state_dict(corrupt)
    with pytest.raises(SmiError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(SmiError, match="no state_dict"):
        read_state_dict(tmp_path / "list.pth")


def test_checkpoint_that_does_not_fit_names_the_weight(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", **{**TINY_ARGS, "num_classes": 100})
    path = tmp_path / "hundred.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(SmiError, match=r"head.weight is \(100, 48\) in the checkpoint but \(10, 48\).*--model-args"):
        load_model(ModelSpec("vit_tiny_patch16_224", TINY_ARGS, checkpoint=str(path)))


def test_model_folder_round_trip(tmp_path, tiny_loaded):
    save_model(tmp_path / "teacher", tiny_loaded, {"accuracy": {"top1": 12.5}})
    spec = ModelSpec.from_dir(tmp_path / "teacher")
    assert spec.name == tiny_loaded.spec.name and spec.args == tiny_loaded.spec.args
    assert spec.mean == (0.5,) and spec.std == (0.5,)
    again = load_model(spec)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(again.model(x), tiny_loaded.model(x))
    with pytest.raises(SmiError, match="not a model folder"):
        ModelSpec.from_dir(tmp_path)
