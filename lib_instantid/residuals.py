"""ControlNet (IdentityNet) residuals added to the webui's UNet, by hooks.

A forward pre-hook on the UNet runs each control net on the same ``x``, timesteps and ``y`` as the
UNet, with the unit's tokens (picked per row by its cond/uncond label) as context and the unit's
hint image at the size of this call's latent. The residual of input block i is added to the skip
connection that output block ``n-1-i`` receives (the second part of its concatenated input, as
diffusers adds it to ``down_block_res_samples``), and the middle residual to the middle block's
output. Any replacement forward that calls the blocks as modules (sd-webui-controlnet's does)
keeps working, and its own residuals add up with ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .hooks import HookSet
from .ip_attention import CallState
from .unet_layers import input_output_blocks

HintFn = Callable[[int, int, torch.device, torch.dtype], torch.Tensor]


@dataclass
class ControlUnit:
    """One control net: ``net(x, t, context, y, hint) -> (down residuals, mid residual)``.

    ``tokens``: [kinds, T, context_dim], kind 0 = cond, 1 = uncond.
    ``hint``: (height px, width px, device, dtype) -> [1, 3, H, W] in [0, 1].
    """

    name: str
    net: torch.nn.Module
    tokens: torch.Tensor
    hint: HintFn


def _unet_inputs(args, kwargs):
    names = ("x", "timesteps", "context", "y")
    values = {n: kwargs.get(n) for n in names}
    for name, value in zip(names, args):
        values[name] = value
    return values["x"], values["timesteps"], values["y"]


class ResidualPatch:
    def __init__(self, unet: torch.nn.Module, units: Sequence[ControlUnit], state: CallState) -> None:
        self.unet = unet
        self.units = list(units)
        self.state = state
        self.pending: Optional[Tuple[List[torch.Tensor], torch.Tensor]] = None
        self._tokens_on = {}

    def _tokens(self, u: int, unit: ControlUnit, device, dtype) -> torch.Tensor:
        key = (u, device, dtype)
        if key not in self._tokens_on:
            self._tokens_on[key] = unit.tokens.to(device=device, dtype=dtype)
        return self._tokens_on[key]

    def compute(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]):
        downs: Optional[List[torch.Tensor]] = None
        mid = None
        for u, unit in enumerate(self.units):
            scale = self.state.control_scales[u]
            if scale == 0.0:
                continue
            param = next(unit.net.parameters())
            device, dtype = param.device, param.dtype
            rows = x.shape[0]
            kinds = self.state.kinds_for(rows, device)
            context = self._tokens(u, unit, device, dtype).index_select(0, kinds)
            in_ch = unit.net.conv_in.weight.shape[1]
            xin = x[:, :in_ch].to(device, dtype)
            t = timesteps.to(device)
            if t.dim() == 0:
                t = t.expand(rows)
            hint = unit.hint(x.shape[-2] * 8, x.shape[-1] * 8, device, dtype).expand(rows, -1, -1, -1)
            yy = None if y is None else y.to(device, dtype)
            d, m = unit.net(xin, t, context, yy, hint, scale=scale)
            if downs is None:
                downs, mid = list(d), m
            else:
                downs = [a + b for a, b in zip(downs, d)]
                mid = mid + m
        return None if downs is None else (downs, mid)

    def install(self, hooks: HookSet) -> None:
        inputs, middle, outputs = input_output_blocks(self.unet)
        n_in = len(inputs)

        def before_unet(module, args, kwargs):
            x, timesteps, y = _unet_inputs(args, kwargs)
            self.pending = self.compute(x, timesteps, y)
            return None

        def after_unet(module, args, kwargs, output):
            self.pending = None
            return None

        # Without autograd the residuals are added in place: the middle block's output and each
        # output block's concatenated input are fresh tensors that nothing else holds.
        def add_mid(module, args, output):
            if self.pending is None:
                return None
            mid = self.pending[1].to(output.device, output.dtype)
            return output.add_(mid) if not torch.is_grad_enabled() else output + mid

        def add_skip(module, args, index):
            if self.pending is None:
                return None
            h = args[0]
            res = self.pending[0][index].to(h.device, h.dtype)
            c = res.shape[1]
            if not torch.is_grad_enabled():
                h[:, -c:].add_(res)       # the skip half of cat([h, skip])
                return None
            return (torch.cat([h[:, :-c], h[:, -c:] + res], dim=1),) + tuple(args[1:])

        hooks.pre(self.unet, before_unet, with_kwargs=True)
        hooks.post(self.unet, after_unet, with_kwargs=True, always_call=True)
        hooks.post(middle, add_mid)
        for j, block in enumerate(outputs):
            hooks.pre(block, lambda m, a, i=n_in - 1 - j: add_skip(m, a, i))
