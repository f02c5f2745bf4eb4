"""InstantID's IdentityNet: a diffusers-format ControlNet, written as a small torch module.

IdentityNet is an SDXL ControlNet stored with diffusers parameter names (``conv_in.weight``,
``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight``,
``controlnet_down_blocks.3.weight``...). This module rebuilds that network from the diffusers
``config.json`` dict so the published weights load with ``strict=True``, without diffusers and
without the webui. SD1.5/SD2-style ControlNet configs (conv ``proj_in``, no added embedding)
are supported too.

Inputs follow the webui's (ldm/sgm) conventions:

* ``x``: the latent the UNet gets, ``[B, 4, h, w]``;
* ``timesteps``: the same discrete timesteps as the UNet, ``[B]`` (or a scalar);
* ``context``: for InstantID the 16 face tokens ``[B, 16, 2048]``, not the prompt;
* ``y``: the webui's SDXL ``vector`` ``[B, 2816]`` = pooled text (1280) followed by the
  256-wide sinusoidal embeddings of original size, crop coords and target size. This is what
  diffusers builds as ``cat(text_embeds, time_proj(time_ids))``, so it goes straight into
  ``add_embedding``;
* ``hint``: the keypoint image ``[B or 1, 3, 8h, 8w]`` with values in [0, 1].

The output is one residual per UNet input block plus one for the middle block; see
:func:`residual_targets` for where each one goes.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFileError
from .identitynet_config import (INSTANTID_CONFIG, Arch, ResidualTarget, infer_config,  # noqa: F401 (re-exported)
                                 is_identitynet_state_dict, parse_config, residual_targets)

__all__ = [
    "IdentityNet",
    "ResidualTarget",
    "INSTANTID_CONFIG",
    "infer_config",
    "is_identitynet_state_dict",
    "residual_targets",
    "timestep_embedding",
]

_TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm in front of every spatial transformer (fixed, not norm_eps)
_LAYER_NORM_EPS = 1e-5  # LayerNorms inside transformer blocks (fixed)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of ``timesteps`` ``[N]``, computed in float32.

    With the defaults (cos first, shift 0) it equals ldm/sgm ``timestep_embedding``, which the
    webui also uses for the SDXL size/crop numbers inside ``vector``.
    """
    half = dim // 2
    t = timesteps.reshape(-1).to(torch.float32)
    idx = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(idx * (-math.log(max_period) / (half - freq_shift)))
    args = t[:, None] * freqs[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------
# building blocks (attribute names follow the diffusers checkpoint layout)
# --------------------------------------------------------------------------------------------


class _EmbedMLP(nn.Module):
    """Linear -> SiLU -> Linear (``linear_1`` / ``linear_2``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(v)))


class _HintEncoder(nn.Module):
    """Small conv stack that turns the keypoint image (8x latent size) into latent-size features."""

    def __init__(self, in_ch: int, widths: Sequence[int], out_ch: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Conv2d(a, a, 3, padding=1))
            blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(img))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, eps: float, out_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.out_scale == 1.0 else out / self.out_scale


class _Downsample(nn.Module):
    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class _Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and ``to_out.0``."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        src = x if ctx is None else ctx
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(src)), self._split(self.to_v(src))
        if self.upcast and q.dtype != torch.float32:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, h * d))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is a parameter-free dropout slot in the checkpoint layout (net.0 / net.2)
        self.net = nn.ModuleList([_GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, ctx_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn1 = _Attention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn2 = _Attention(dim, ctx_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.ff = _FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class _SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, depth: int, ctx_dim: int, groups: int, linear: bool, upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=_TRANSFORMER_NORM_EPS)
        if linear:
            self.proj_in = nn.Linear(ch, ch)
            self.proj_out = nn.Linear(ch, ch)
        else:
            self.proj_in = nn.Conv2d(ch, ch, 1)
            self.proj_out = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [_TransformerBlock(ch, ctx_dim, heads, upcast) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hh * ww, c))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        for block in self.transformer_blocks:
            h = block(h, ctx)
        if self.linear:
            h = self.proj_out(h).reshape(b, hh, ww, c).permute(0, 3, 1, 2).contiguous()
        else:
            h = self.proj_out(h.reshape(b, hh, ww, c).permute(0, 3, 1, 2).contiguous())
        return h + x


class _DownStage(nn.Module):
    """``layers`` resnets (each optionally followed by a spatial transformer), then a downsampler."""

    def __init__(self, c_in: int, c_out: int, arch: Arch, index: int):
        super().__init__()
        emb_dim = arch.channels[0] * 4
        self.resnets = nn.ModuleList(
            [_ResBlock(c_in if j == 0 else c_out, c_out, emb_dim, arch.groups, arch.eps) for j in range(arch.layers)]
        )
        if arch.down_types[index] == "CrossAttnDownBlock2D":
            self.attentions = nn.ModuleList(
                [
                    _SpatialTransformer(
                        c_out, arch.heads[index], arch.depths[index], arch.context_dim, arch.groups,
                        arch.linear_proj, arch.upcast_attention,
                    )
                    for _ in range(arch.layers)
                ]
            )
        else:
            self.attentions = None
        last = index == len(arch.channels) - 1
        self.downsamplers = None if last else nn.ModuleList([_Downsample(c_out, arch.downsample_padding)])

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        outs = []
        for j, res in enumerate(self.resnets):
            h = res(h, emb)
            if self.attentions is not None:
                h = self.attentions[j](h, ctx)
            outs.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            outs.append(h)
        return h, outs


class _MidStage(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        ch = arch.channels[-1]
        emb_dim = arch.channels[0] * 4
        self.resnets = nn.ModuleList(
            [_ResBlock(ch, ch, emb_dim, arch.groups, arch.eps, arch.mid_scale) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [
                _SpatialTransformer(
                    ch, arch.heads[-1], arch.mid_depth, arch.context_dim, arch.groups,
                    arch.linear_proj, arch.upcast_attention,
                )
            ]
        )

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, ctx)
        return self.resnets[1](h, emb)


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


class IdentityNet(nn.Module):
    """Diffusers-layout ControlNet built from its ``config.json`` dict.

    ``forward(x, timesteps, context, y, hint, scale)`` returns ``(down_residuals, mid_residual)``.
    The parameters keep the diffusers checkpoint names, so ``load_state_dict(strict=True)`` takes
    the published file as is. Use :meth:`from_state_dict` to build and load in one step.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        arch = parse_config(config)
        self.arch = arch
        c0 = arch.channels[0]
        emb_dim = c0 * 4
        self.conv_in = nn.Conv2d(arch.in_channels, c0, 3, padding=1)
        self.time_embedding = _EmbedMLP(c0, emb_dim)
        self.add_embedding = _EmbedMLP(arch.add_embed_in, emb_dim) if arch.add_embed_in else None
        self.controlnet_cond_embedding = _HintEncoder(arch.hint_channels, arch.hint_widths, c0)

        self.down_blocks = nn.ModuleList()
        zero_convs = [nn.Conv2d(c0, c0, 1)]
        prev = c0
        for i, ch in enumerate(arch.channels):
            stage = _DownStage(prev, ch, arch, i)
            self.down_blocks.append(stage)
            n_out = arch.layers + (0 if stage.downsamplers is None else 1)
            zero_convs.extend(nn.Conv2d(ch, ch, 1) for _ in range(n_out))
            prev = ch
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.mid_block = _MidStage(arch)
        self.controlnet_mid_block = nn.Conv2d(arch.channels[-1], arch.channels[-1], 1)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: Optional[Mapping[str, Any]] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ) -> "IdentityNet":
        """Build the network and load ``state_dict`` strictly; returns it in eval mode, no grad.

        ``config`` defaults to :func:`infer_config` of the state dict. The module is created on
        the meta device and takes the given tensors (converted to ``dtype``/``device`` when
        given), so no random init and no second copy of the weights. A key or shape mismatch
        raises :class:`ModelFileError`.
        """
        if not is_identitynet_state_dict(state_dict.keys()):
            raise ModelFileError(
                "This file is not a diffusers-format ControlNet (InstantID IdentityNet): it has no "
                "'controlnet_cond_embedding.conv_in.weight' / 'controlnet_down_blocks.0.weight' keys."
            )
        if config is None:
            config = infer_config(state_dict)
        with torch.device("meta"):
            net = cls(config)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        problem = _describe_mismatch(expected, state_dict)
        if problem:
            raise ModelFileError(
                "The IdentityNet (InstantID ControlNet) weights do not match its config: "
                f"{problem}. Use the original ControlNetModel/diffusion_pytorch_model.safetensors "
                "from InstantX/InstantID with its config.json."
            )
        tensors = {}
        for k in expected:
            t = state_dict[k]
            if dtype is not None or device is not None:
                t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
            tensors[k] = t
        net.load_state_dict(tensors, strict=True, assign=True)
        net.eval()
        net.requires_grad_(False)
        return net

    # ---- running ---------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timesteps: Union[torch.Tensor, float, int],
        context: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        hint: Optional[torch.Tensor] = None,
        scale: Union[float, torch.Tensor] = 1.0,
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Return ``(down_residuals, mid_residual)``, each multiplied by ``scale``.

        ``scale`` is a float or a ``[B]`` tensor (one weight per batch row). Inputs are cast to
        the module's dtype; outputs come in that dtype. ``hint`` and ``context`` may have batch 1
        (broadcast to B).
        """
        if hint is None:
            raise ValueError("IdentityNet needs the keypoint image (hint).")
        weight = self.conv_in.weight
        dtype, dev = weight.dtype, weight.device
        b = x.shape[0]
        x = x.to(device=dev, dtype=dtype)
        if hint.shape[-2] != x.shape[-2] * 8 or hint.shape[-1] != x.shape[-1] * 8:
            raise ValueError(
                f"IdentityNet hint must be 8x the latent size: got {tuple(hint.shape[-2:])} for "
                f"latent {tuple(x.shape[-2:])}."
            )
        hint = _batch(hint, b, "hint").to(device=dev, dtype=dtype)
        if self.arch.bgr:
            hint = hint.flip(1)
        context = _batch(context, b, "context").to(device=dev, dtype=dtype)

        t = torch.as_tensor(timesteps, device=dev).reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        emb = self.time_embedding(
            timestep_embedding(t, self.arch.channels[0], self.arch.flip_sin_to_cos, self.arch.freq_shift).to(dtype)
        )
        if self.add_embedding is not None:
            if y is None:
                raise ValueError("This IdentityNet (SDXL) needs the SDXL conditioning vector y.")
            emb = emb + self.add_embedding(y.to(device=dev, dtype=dtype))

        h = self.conv_in(x) + self.controlnet_cond_embedding(hint)
        feats = [h]
        for stage in self.down_blocks:
            h, outs = stage(h, emb, context)
            feats.extend(outs)
        h = self.mid_block(h, emb, context)

        downs = [conv(f) for conv, f in zip(self.controlnet_down_blocks, feats)]
        mid = self.controlnet_mid_block(h)
        if self.arch.global_pool:
            downs = [d.mean(dim=(2, 3), keepdim=True) for d in downs]
            mid = mid.mean(dim=(2, 3), keepdim=True)

        if isinstance(scale, torch.Tensor) and scale.numel() > 1:
            s = scale.to(device=dev, dtype=dtype).reshape(-1, 1, 1, 1)
        else:
            s = float(scale)
        if isinstance(s, float) and s == 1.0:
            return downs, mid
        return [d * s for d in downs], mid * s


def _batch(t: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"IdentityNet {name} has batch {t.shape[0]}, expected {b} or 1.")


def _describe_mismatch(expected: Mapping[str, Tuple[int, ...]], state_dict: Mapping[str, Any]) -> str:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} instead of {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) with the wrong shape (e.g. {'; '.join(wrong[:3])})")
    return "; ".join(parts)
