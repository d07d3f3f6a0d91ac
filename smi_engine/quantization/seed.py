"""The ``seed`` scheme: the quantiser of the seed (Egg-Hu/SMI), which is PSAQ-ViT's, for any
timm ViT the engine accepts.

Activation quantisers (per tensor, asymmetric, running min/max over the calibration images by
default) sit on: the input image; the patch-embedding output; the tokens with the prefix
tokens (class, distillation, registers) prepended; the position embedding; their sum; in every
block the first LayerNorm's output, the qkv output (one range for q, k and v), the pre-softmax
attention logits, the attention output, the proj output, the first residual sum, the second
LayerNorm's output, the GELU output, the fc2 output and the second residual sum; the final
norm's class token (the head's input) and the logits. Weights per output channel, symmetric.
That is 5 + 10 per block + 2 quantisers: 27 on a depth-2 ViT.

Sparse images are fed as the seed feeds them: the whole image with stopped patches at the
normaliser's zero runs through the input quantiser, the patch embedding and the embedding
quantisers; only then are the stopped patches' tokens dropped, and the blocks see the rest.

For block reconstruction the model is a chain of units (the embedding, each block, the head):
views that compose the registered modules without owning them, so the state dict keeps the
seed's layout.
"""

from __future__ import annotations

import torch
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.vit.patches import indices_from_mask
from smi_engine.vit.patches import blank_stopped
from smi_engine.quantization.layers import QuantLinear, finish_quantizers, swap_linear_layers
from smi_engine.quantization.scheme import QuantConfig
from smi_engine.vit.sparse_vit import SparseViT


class SeedBlockQuantizers(nn.Module):
    """The ten activation quantisers of one transformer block, in the order the block meets them."""

    NAMES = ("norm1", "qkv", "logits", "attention", "proj", "residual1", "norm2", "gelu", "fc2", "residual2")

    def __init__(self, config: QuantConfig):
        super().__init__()
        for name in self.NAMES:
            self.add_module(name, config.activation())


class SeedEmbedding(nn.Module):
    """Image -> token sequence with the seed's five embedding quantisers."""

    def __init__(self, owner: "SeedQuantViT"):
        super().__init__()
        self.patch_embed = owner.model.patch_embed
        for name in ("image", "patches", "tokens", "position", "embedded"):
            self.add_module(name, getattr(owner, name))
        self._vit = (owner.model,)  # read for its tokens, not owned: a tuple is not registered

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self._vit[0]
        x = self.patch_embed.proj(self.image(images)).flatten(2).transpose(1, 2)
        x = self.patches(self.patch_embed.norm(x))
        prefix = [t for t in (getattr(m, "cls_token", None), getattr(m, "dist_token", None), getattr(m, "reg_token", None))
                  if t is not None]
        p = m.num_prefix_tokens
        x = self.tokens(torch.cat([t.expand(len(x), -1, -1) for t in prefix] + [x], dim=1))
        position = self.position(m.pos_embed)
        if m.no_embed_class:  # the position embedding covers the patches only
            return self.embedded(torch.cat([x[:, :p], x[:, p:] + position], dim=1))
        return self.embedded(x + position)


class SeedBlock(nn.Module):
    """One timm block run with its ten quantisers."""

    def __init__(self, block: nn.Module, quantizers: SeedBlockQuantizers):
        super().__init__()
        self.block, self.quantizers = block, quantizers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, q = self.block, self.quantizers
        a = block.attn
        b, n, _ = x.shape
        qkv = q.qkv(a.qkv(q.norm1(block.norm1(x))))
        query, key, value = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        query, key = a.q_norm(query), a.k_norm(key)
        probs = q.logits((query @ key.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        out = q.attention(a.norm((probs @ value).transpose(1, 2).reshape(b, n, -1)))
        x = q.residual1(x + block.ls1(q.proj(a.proj(out))))
        mlp = block.mlp
        hidden = q.gelu(mlp.act(mlp.fc1(q.norm2(block.norm2(x)))))
        return q.residual2(x + block.ls2(q.fc2(mlp.fc2(mlp.norm(hidden)))))


class SeedHead(nn.Module):
    """Final-norm tokens -> logits, with the head-input and logit quantisers."""

    def __init__(self, owner: "SeedQuantViT"):
        super().__init__()
        m = owner.model
        self.head, self.head_dist = m.head, getattr(m, "head_dist", None)
        self.features, self.logits = owner.features, owner.logits
        self._vit = (m,)  # for its pooling, not owned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_dist is not None:  # distilled DeiT: both heads, averaged
            return self.logits((self.head(self.features(x[:, 0])) + self.head_dist(self.features(x[:, 1]))) / 2)
        return self.logits(self.head(self.features(self._vit[0].forward_head(x, pre_logits=True))))


class SeedQuantViT(nn.Module):
    """A timm ViT run with the seed's quantisers; the timm model is held, not modified."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        super().__init__()
        self.grid = SparseViT(model).grid  # refuses what is not a timm ViT
        if getattr(model, "dynamic_img_size", False) or getattr(model, "pos_embed", None) is None:
            raise SmiError(f"--scheme seed needs a ViT with a fixed learned position embedding; "
                           f"{type(model).__name__} has none: use --scheme matmul or repq")
        for block in model.blocks:
            if not all(hasattr(block, a) for a in ("norm1", "attn", "norm2", "mlp")) or not hasattr(block.attn, "qkv"):
                raise SmiError(f"--scheme seed needs timm's Block (norm1, attn.qkv, norm2, mlp), not {type(block).__name__}: "
                               "use --scheme matmul")
        swap_linear_layers(model, lambda _name, layer: QuantLinear(layer, config.w_bit))
        self.model = model
        q = config.activation
        self.image, self.patches, self.tokens, self.position, self.embedded = q(), q(), q(), q(), q()
        self.blocks = nn.ModuleList(SeedBlockQuantizers(config) for _ in model.blocks)
        self.features, self.logits = q(), q()
        # A plain list: the units are views of the modules above, kept out of the state dict.
        self._units = [SeedEmbedding(self), *(SeedBlock(b, qs) for b, qs in zip(model.blocks, self.blocks)), SeedHead(self)]

    # The attributes timm-aware code reads from a model (sizes, classes, data config).
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def pretrained_cfg(self) -> dict:
        return self.model.pretrained_cfg

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        names = ["embedding", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]
        return list(zip(names, self._units))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_masked(images, None)

    def forward_masked(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits of (B, C, H, W) images, feeding the blocks only the patches ``keep`` allows."""
        if keep is not None:
            images = blank_stopped(images, keep)
        embedding, *blocks, head = self._units
        x = embedding(images)
        if keep is not None:
            p = self.model.num_prefix_tokens
            kept = indices_from_mask(keep.to(x.device)) + p
            prefix = torch.arange(p, device=x.device).expand(len(x), -1)
            index = torch.cat([prefix, kept], dim=1)
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.model.norm_pre(x)
        for block in blocks:
            x = block(x)
        return head(self.model.norm(x))


class SeedScheme:
    description = "the seed's (PSAQ-ViT's) positions: image, embeddings, every block's outputs and residual sums, logits"
    default_calibrator = "minmax"

    def build(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        return SeedQuantViT(model, config)

    def finish(self, qmodel: nn.Module, config: QuantConfig) -> None:
        finish_quantizers(qmodel)
