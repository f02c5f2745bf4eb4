"""Decoupled cross-attention: Z = Attn(Q, Kt, Vt) + sum over units of s * Attn(Q, Ki, Vi).

The webui's own attention forward (whichever optimisation it selected: sdp, xformers,
sub-quadratic, split...) computes the text term. Two hooks per attn2 module add the image term
without replacing that forward: a forward hook on ``to_q`` keeps Q, and a forward pre-hook on
``to_out[0]`` adds the image attention to the text attention's output before the output
projection, which is exactly where diffusers' IP-Adapter processor adds it.

Each unit's K/V are computed once per generation for each token kind (cond = image/face tokens,
uncond = the projection of an empty input); every call picks per row the kind its label says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .hooks import HookSet
from .rows import COND
from .unet_layers import CrossAttnLayer

log = logging.getLogger("instantid")


@dataclass
class AttentionUnit:
    """One adapter's contribution to the cross-attention layers.

    ``tokens``: [kinds, T, context_dim] (kind 0 = cond, 1 = uncond).
    ``weights``: layer index k -> (to_k_ip weight, to_v_ip weight), each [inner, context_dim].
    ``layer_scales``: optional per-layer multipliers (weight types), default 1.
    """

    name: str
    tokens: torch.Tensor
    weights: Dict[int, Tuple[torch.Tensor, torch.Tensor]]
    layer_scales: Optional[Sequence[float]] = None
    mask: Optional[torch.Tensor] = None   # [H, W] in [0, 1], or None for the whole image
    kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masks: Dict[tuple, Optional[torch.Tensor]] = field(default_factory=dict, repr=False)

    def mask_for(self, tokens: int, latent_hw, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask on a layer's token grid, [1, tokens, 1, 1] like ``like``; computed once per size."""
        key = (tokens, latent_hw, like.device, like.dtype)
        if key not in self._masks:
            m = _mask_for(self.mask, tokens, latent_hw)
            self._masks[key] = None if m is None else m.to(like)[..., None]
        return self._masks[key]

    def prepare(self, layers: Sequence[CrossAttnLayer], device, dtype) -> None:
        """Project this unit's tokens through every layer's to_k_ip/to_v_ip, once."""
        self.kv.clear()
        for layer in layers:
            if layer.index not in self.weights:
                continue
            wk, wv = self.weights[layer.index]
            tokens = self.tokens.to(device=wk.device, dtype=torch.float32)
            k = tokens @ wk.to(torch.float32).t()
            v = tokens @ wv.to(torch.float32).t()
            self.kv[layer.index] = (k.to(device, dtype), v.to(device, dtype))

    def scale_for(self, layer_index: int) -> float:
        if self.layer_scales is None:
            return 1.0
        return float(self.layer_scales[layer_index])


class CallState:
    """What the current model call needs: its rows' kinds and each unit's scale at this step."""

    def __init__(self) -> None:
        self.kinds: Optional[torch.Tensor] = None      # [B] long, on CPU
        self.unit_scales: List[float] = []      # per attention unit, at this step
        self.control_scales: List[float] = []   # per control unit, at this step
        self.latent_hw: Optional[Tuple[int, int]] = None
        self._on_device: Dict[torch.device, torch.Tensor] = {}
        self._uniform: Optional[int] = None
        self._warned = False

    def set_call(self, kinds: Optional[torch.Tensor]) -> None:
        self.kinds = kinds
        self._on_device = {}
        # decided here, on the CPU copy: the per-layer hooks must not synchronise with the GPU
        self._uniform = int(kinds[0]) if kinds is not None and len(kinds) and bool((kinds == kinds[0]).all()) else None

    def uniform_kind(self, rows: int) -> Optional[int]:
        """The kind shared by every row of the call, or None when the rows differ."""
        if self.kinds is None or self.kinds.shape[0] != rows:
            return COND
        return self._uniform

    def kinds_for(self, rows: int, device: torch.device) -> torch.Tensor:
        kinds = self.kinds
        if kinds is None or kinds.shape[0] != rows:
            if kinds is not None and not self._warned:
                self._warned = True
                log.warning("InstantID: an attention call of %d rows does not match the %d rows of "
                            "the model call; treating them as conditional.", rows, kinds.shape[0])
            return torch.full((rows,), COND, dtype=torch.long, device=device)
        cached = self._on_device.get(device)
        if cached is None:
            cached = self._on_device[device] = kinds.to(device)
        return cached


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H, D] (a transposed view, not copied) of the attention of q [B,N,C] over k, v [B|1,T,C]."""
    b, n, c = q.shape
    d = c // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(k.shape[0], -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    v = v.view(v.shape[0], -1, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _mask_for(mask: torch.Tensor, tokens: int, latent_hw: Optional[Tuple[int, int]]) -> Optional[torch.Tensor]:
    """The region mask resized to a layer's token grid ([1, tokens, 1]), or None if unknown."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    for factor in (1, 2, 4, 8, 16):
        hh, ww = -(-h // factor), -(-w // factor)   # the UNet's stride-2 convs round up
        if hh * ww == tokens:
            m = F.interpolate(mask[None, None].float(), size=(hh, ww), mode="bilinear",
                              align_corners=False)
            return m.reshape(1, tokens, 1)
    return None


class IPAttentionPatch:
    """Adds the units' image attention to each cross-attention layer."""

    def __init__(self, layers: Sequence[CrossAttnLayer], units: Sequence[AttentionUnit],
                 state: CallState) -> None:
        self.layers = list(layers)
        self.units = list(units)
        self.state = state

    def add_image_terms(self, layer: CrossAttnLayer, q: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        """``out`` (to_out[0]'s input) plus every active unit's image attention, or None if none acts.

        Without autograd the terms are added in place: ``out`` is the attention result the webui's
        forward has just made for to_out[0] and nothing else holds it.
        """
        target = None
        uniform = self.state.uniform_kind(q.shape[0])
        kinds = None
        for u, unit in enumerate(self.units):
            kv = unit.kv.get(layer.index)
            scale = self.state.unit_scales[u] * unit.scale_for(layer.index) if kv else 0.0
            if scale == 0.0:
                continue
            k, v = kv
            if k.device != q.device or k.dtype != q.dtype:   # lowvram/medvram, fp8 weights: move once
                k, v = k.to(q.device, q.dtype), v.to(q.device, q.dtype)
                unit.kv[layer.index] = (k, v)
            if uniform is not None:    # every row of the same kind: broadcast, no copy
                k, v = k[uniform:uniform + 1], v[uniform:uniform + 1]
            else:
                if kinds is None:
                    kinds = self.state.kinds_for(q.shape[0], q.device)
                k, v = k.index_select(0, kinds), v.index_select(0, kinds)
            term = _attention(q, k, v, layer.module.heads)
            if unit.mask is not None:
                m = unit.mask_for(q.shape[1], self.state.latent_hw, term)
                if m is not None:
                    term = term * m
            if target is None:
                in_place = not torch.is_grad_enabled() and out.is_contiguous()
                target = out if in_place else out.contiguous().clone()
            b, n, c = target.shape
            target.view(b, n, term.shape[2], term.shape[3]).add_(term.to(target.dtype), alpha=scale)
        return target

    def install(self, hooks: HookSet) -> None:
        for layer in self.layers:
            if not any(layer.index in unit.kv for unit in self.units):
                continue
            slot: List[Optional[torch.Tensor]] = [None]

            def keep_q(module, args, output, slot=slot):
                slot[0] = output

            def add_image_term(module, args, layer=layer, slot=slot):
                q, slot[0] = slot[0], None
                if q is None or q.shape[:2] != args[0].shape[:2]:
                    return None
                out = self.add_image_terms(layer, q, args[0])
                return None if out is None else (out,) + tuple(args[1:])

            hooks.post(layer.module.to_q, keep_q)
            hooks.pre(layer.module.to_out[0], add_image_term)
