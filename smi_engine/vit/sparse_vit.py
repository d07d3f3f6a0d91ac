"""Run a timm Vision Transformer on a subset of its patches, and score patches by CLS attention.

The adapter composes the model's own modules; it never patches timm. Patches that are not fed
are simply absent from the token sequence: no embedding, no attention, no MLP, no backward.
Any ``VisionTransformer`` passes by its attributes (patch embedding, prefix tokens, blocks), so
distilled DeiT, register tokens, ``no_embed_class`` and any image/patch size work.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from smi_engine.errors import SmiError
from smi_engine.vit.patches import PatchGrid, indices_from_mask

ATTENTION_KERNELS = ("fused", "explicit")


@dataclass
class SparseOutput:
    logits: torch.Tensor
    #: Token sequence after each block, (B, P + K, E): prefix tokens first, then the fed patches.
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    #: Each block's multi-head attention output before its projection, (B, P + K, heads*head_dim);
    #: filled only when asked for (``attention_outputs=True``).
    attention_outputs: list[torch.Tensor] = field(default_factory=list)


def _patch_embed_conv(model: nn.Module) -> nn.Conv2d:
    """The patch embedding's convolution (also inside a wrapper, e.g. a quantised one)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    proj = next((m for m in proj.modules() if isinstance(m, nn.Conv2d)), None) if proj is not None else None
    if proj is None:
        raise SmiError(
            f"{type(model).__name__} has no convolutional patch embedding (patch_embed.proj): "
            "sparse inversion needs a timm VisionTransformer/DeiT"
        )
    if proj.kernel_size != proj.stride or proj.padding not in ((0, 0), 0) or proj.groups != 1:
        raise SmiError(
            f"{type(model).__name__}'s patch embedding is not one non-overlapping patch per token "
            "(kernel == stride, no padding): it cannot drop patches"
        )
    return proj


class SparseViT:
    """Token-dropping view of a timm ``VisionTransformer`` (the wrapped model is not modified)."""

    def __init__(self, model: nn.Module, attention: str = "fused"):
        missing = [a for a in ("patch_embed", "blocks", "num_prefix_tokens", "_pos_embed", "forward_head")
                   if not hasattr(model, a)]
        if missing:
            raise SmiError(
                f"{type(model).__name__} is not a timm Vision Transformer (it lacks {', '.join(missing)}): "
                "choose a ViT/DeiT, e.g. --model vit_tiny_patch16_224"
            )
        proj = _patch_embed_conv(model)
        self.model = model
        rows, cols = model.patch_embed.grid_size
        ph, pw = proj.kernel_size
        self.grid = PatchGrid(proj.in_channels, rows * ph, cols * pw, ph, pw)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.width = int(proj.out_channels)
        self.set_attention_kernel(attention)
        self._trunk = self._run_blocks

    def compile(self, graphs: int) -> None:
        """Run the block stack through ``torch.compile``: one static graph per token count, so
        a schedule compiles once per stage (the views with attention capture stay eager);
        ``graphs`` is how many the run needs, which torch's default cache may not hold."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, graphs)
        self._trunk = torch.compile(self._run_blocks, dynamic=False)

    def _run_blocks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs = []
        for block in self.model.blocks:
            x = block(x)
            outputs.append(x)
        return outputs, self.model.forward_head(self.model.norm(x))

    # -- properties -----------------------------------------------------------------------
    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_attention_kernel(self, kernel: str) -> None:
        """Use timm's fused ``scaled_dot_product_attention`` or the explicit softmax(QK^T)V."""
        if kernel not in ATTENTION_KERNELS:
            raise SmiError(f"unknown attention kernel {kernel!r}: use one of {', '.join(ATTENTION_KERNELS)}")
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = kernel == "fused"

    def check_scorable(self) -> None:
        """Raise SmiError unless patches can be scored by the last block's CLS attention."""
        if not self.has_class_token:
            raise SmiError(
                f"{type(self.model).__name__} has no class token, and sparse inversion scores patches "
                "by the class token's attention: use --schedule dense or a model with class_token=True"
            )
        attn = getattr(self.model.blocks[-1], "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
            raise SmiError(
                f"cannot read attention weights from the last block ({type(attn).__name__}): "
                "sparse inversion needs a timm Attention with a fused qkv projection; use --schedule dense"
            )

    # -- forward --------------------------------------------------------------------------
    def embed(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Patch vectors (B, K, D) at grid positions (B, K) -> token sequence (B, P + K, E)."""
        m, g = self.model, self.grid
        proj = m.patch_embed.proj
        if type(proj) is nn.Conv2d:  # a patch-sized convolution on one patch is a matrix product
            x = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
        else:  # a wrapped embedding (e.g. quantised) sees each patch as a tiny image
            b, k = patches.shape[:2]
            x = proj(patches.reshape(b * k, g.channels, g.patch_h, g.patch_w)).reshape(b, k, -1)
        x = m.patch_embed.norm(x)
        # The model's own position embedding applied to zero patches yields exactly the prefix
        # tokens (with their embedding) followed by each grid position's additive embedding.
        zeros = x.new_zeros(1, self.grid.rows, self.grid.cols, x.shape[-1])
        if not getattr(m, "dynamic_img_size", False):
            zeros = zeros.flatten(1, 2)
        base = m._pos_embed(zeros)
        prefix, position_embedding = base[:, : self.num_prefix_tokens], base[0, self.num_prefix_tokens:]
        x = x + position_embedding[positions]
        x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        return m.norm_pre(x)

    def forward(
        self, patches: torch.Tensor, positions: torch.Tensor, attention_outputs: bool = False
    ) -> SparseOutput:
        """Logits (and per-block tokens) of the model fed only these patches at these positions."""
        out = SparseOutput(logits=torch.empty(0))
        x = self.embed(patches, positions)
        if attention_outputs:
            with self._capture_attention_outputs(out.attention_outputs):
                out.block_outputs, out.logits = self._run_blocks(x)
        else:
            out.block_outputs, out.logits = self._trunk(x)
        return out

    def forward_images(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of full images (B, C, H, W), feeding only the patches a keep mask allows."""
        patches = self.grid.patchify(images)
        if keep is None:
            positions = torch.arange(self.grid.num_patches, device=images.device).expand(images.shape[0], -1)
        else:
            positions = indices_from_mask(keep.to(images.device))
            patches = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return self.forward(patches, positions).logits

    @torch.no_grad()
    def cls_attention(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last block's attention from the class token to each fed patch, mean over heads: (B, K)."""
        self.check_scorable()
        x = self.embed(patches, positions)
        for block in self.model.blocks[:-1]:
            x = block(x)
        last = self.model.blocks[-1]
        captured: list[torch.Tensor] = []
        handle = last.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            last(x)
        finally:
            handle.remove()
        attn, tokens = last.attn, captured[0]
        b, t, _ = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        q = getattr(attn, "q_norm", nn.Identity())(q)
        k = getattr(attn, "k_norm", nn.Identity())(k)
        weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, T)
        return weights.mean(dim=1)[:, 0, self.num_prefix_tokens:]

    @contextlib.contextmanager
    def _capture_attention_outputs(self, sink: list[torch.Tensor]):
        handles = []
        for block in self.model.blocks:
            proj = getattr(getattr(block, "attn", None), "proj", None)
            if proj is None:
                raise SmiError(
                    f"cannot read attention outputs of {type(block).__name__}: "
                    "this loss needs timm blocks with attn.proj"
                )
            handles.append(proj.register_forward_pre_hook(lambda _m, args: sink.append(args[0])))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
