import pytest
import timm
import torch

from smi_engine.errors import SmiError
from smi_engine.vit.sparse_vit import SparseViT

from .conftest import tiny_model

VARIANTS = {
    "vit": dict(),
    "distilled-deit": dict(name="deit_tiny_distilled_patch16_224"),
    "registers": dict(reg_tokens=4),
    "registers-no-embed-class": dict(reg_tokens=2, no_embed_class=True),
    "grey-non-square": dict(img_size=(32, 48), patch_size=(4, 8), in_chans=1),
    "dynamic-img-size": dict(dynamic_img_size=True),
    "qk-norm": dict(qk_norm=True),
    "avg-pool-with-cls": dict(global_pool="avg"),
}


def _model(variant: str) -> torch.nn.Module:
    kwargs = dict(VARIANTS[variant])
    return tiny_model(kwargs.pop("name", "vit_tiny_patch16_224"), **kwargs)


def _all_positions(vit: SparseViT, batch: int) -> torch.Tensor:
    return torch.arange(vit.grid.num_patches).expand(batch, -1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_patch_kept_equals_timm_forward(variant):
    model = _model(variant)
    vit = SparseViT(model)
    images = torch.randn(3, vit.grid.channels, vit.grid.height, vit.grid.width)
    logits = vit.forward(vit.grid.patchify(images), _all_positions(vit, 3)).logits
    torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["vit", "distilled-deit", "registers-no-embed-class"])
def test_subset_equals_gathering_timm_tokens_after_embedding(variant):
    """Embedding only kept patches == timm's embedding of the full image, then dropping tokens."""
    model = _model(variant)
    vit = SparseViT(model)
    images = torch.randn(2, vit.grid.channels, vit.grid.height, vit.grid.width)
    kept = torch.stack([torch.randperm(vit.grid.num_patches)[:20].sort().values for _ in range(2)])
    tokens = model._pos_embed(model.patch_embed(images))
    p = model.num_prefix_tokens
    index = torch.cat([torch.arange(p).expand(2, -1), kept + p], dim=1)
    x = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    expected = model.forward_head(model.norm(model.blocks(model.norm_pre(x))))
    patches = vit.grid.patchify(images).gather(1, kept.unsqueeze(-1).expand(-1, -1, vit.grid.patch_dim))
    torch.testing.assert_close(vit.forward(patches, kept).logits, expected, rtol=1e-5, atol=1e-5)


def test_cls_attention_is_the_last_blocks_class_row_mean_over_heads():
    model = _model("registers")  # prefix tokens: CLS + 4 registers, which must not be scored
    vit = SparseViT(model, attention="explicit")
    captured = []
    model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    images = torch.randn(2, 3, 32, 32)
    kept = torch.stack([torch.randperm(64)[:30].sort().values for _ in range(2)])
    patches = vit.grid.patchify(images).gather(1, kept.unsqueeze(-1).expand(-1, -1, vit.grid.patch_dim))
    vit.forward(patches, kept)  # explicit attention: the weights pass through attn_drop
    expected = captured[-1].mean(dim=1)[:, 0, 5:]
    scores = vit.cls_attention(patches, kept)
    assert scores.shape == (2, 30)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_attention_outputs_are_captured_per_block_only_when_asked():
    vit = SparseViT(_model("vit"))
    patches = vit.grid.patchify(torch.randn(2, 3, 32, 32))
    positions = _all_positions(vit, 2)
    plain = vit.forward(patches, positions)
    assert plain.attention_outputs == [] and len(plain.block_outputs) == 2
    full = vit.forward(patches, positions, attention_outputs=True)
    assert [a.shape for a in full.attention_outputs] == [(2, 65, 48)] * 2
    torch.testing.assert_close(full.logits, plain.logits)


def test_fused_and_explicit_kernels_agree():
    model = _model("vit")
    vit = SparseViT(model)
    patches = vit.grid.patchify(torch.randn(2, 3, 32, 32))
    fused = vit.forward(patches, _all_positions(vit, 2)).logits
    vit.set_attention_kernel("explicit")
    torch.testing.assert_close(vit.forward(patches, _all_positions(vit, 2)).logits, fused, rtol=1e-5, atol=1e-5)
    with pytest.raises(SmiError, match="unknown attention kernel"):
        vit.set_attention_kernel("flash")


def test_model_without_class_token_cannot_be_scored():
    vit = SparseViT(tiny_model(class_token=False, global_pool="avg"))
    with pytest.raises(SmiError, match="no class token.*--schedule dense"):
        vit.check_scorable()


def test_non_vit_models_are_refused_by_name():
    with pytest.raises(SmiError, match="not a timm Vision Transformer"):
        SparseViT(timm.create_model("resnet18", num_classes=10))


def test_overlapping_patch_embedding_is_refused():
    model = tiny_model()
    model.patch_embed.proj = torch.nn.Conv2d(3, 48, kernel_size=6, stride=4, padding=1)
    with pytest.raises(SmiError, match="non-overlapping"):
        SparseViT(model)
