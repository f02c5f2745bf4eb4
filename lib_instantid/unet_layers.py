"""The webui's UNet as this extension sees it: its cross-attention layers and its family.

The webui runs the ldm (SD1.x/2.x) or sgm (SDXL) ``UNetModel``: ``input_blocks``, ``middle_block``,
``output_blocks``, each cross-attention module reachable as ``...transformer_blocks.N.attn2`` with
``to_q``, ``to_k``, ``to_v``, ``to_out[0]`` and ``heads``.

Adapter files number their layers in diffusers' processor order: down blocks, then up blocks, then
the middle block, attn1 before attn2 in every transformer block. The k-th cross-attention layer in
that order is key ``2k+1`` (``ip_adapter.{2k+1}.to_k_ip.weight``); its self-attention is ``2k``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

import torch

from .errors import InstantIDError

_GROUP_ORDER = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
_ATTN2 = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(?:(\d+)\.)?(\d+)\."
                    r"transformer_blocks\.(\d+)\.attn2$")


@dataclass
class CrossAttnLayer:
    index: int                 # k: position in adapter order
    path: str                  # e.g. "input_blocks.4.1.transformer_blocks.0.attn2"
    module: torch.nn.Module    # the attn2 module
    self_attn: torch.nn.Module  # the attn1 module of the same transformer block
    block: str                 # "input" | "output" | "middle"

    @property
    def key(self) -> int:
        """Index of this layer's attn2 processor in adapter files."""
        return 2 * self.index + 1

    @property
    def inner_dim(self) -> int:
        return self.module.to_k.out_features

    @property
    def context_dim(self) -> int:
        return self.module.to_k.in_features


def _sort_key(match: "re.Match[str]"):
    group, block, sub, tblock = match.groups()
    return (_GROUP_ORDER[group], int(block or 0), int(sub), int(tblock))


def cross_attention_layers(unet: torch.nn.Module) -> List[CrossAttnLayer]:
    """The UNet's cross-attention modules in adapter-file order."""
    found = []
    for name, module in unet.named_modules():
        match = _ATTN2.match(name)
        if match:
            found.append((_sort_key(match), name, module))
    found.sort(key=lambda item: item[0])
    modules = dict(unet.named_modules())
    layers = []
    for k, (_, name, module) in enumerate(found):
        attn1 = modules[name[: -len("attn2")] + "attn1"]
        block = name.split(".", 1)[0].replace("_blocks", "").replace("_block", "")
        layers.append(CrossAttnLayer(k, name, module, attn1, block))
    return layers


@dataclass(frozen=True)
class UNetFamily:
    name: str          # "sdxl" | "sd15" | "sd2" | "unknown"
    context_dim: int
    num_cross_layers: int

    @property
    def label(self) -> str:
        return {"sdxl": "SDXL", "sd15": "SD 1.5", "sd2": "SD 2.x"}.get(self.name, "an unknown model")


def unet_family(unet: torch.nn.Module) -> UNetFamily:
    layers = cross_attention_layers(unet)
    if not layers:
        raise InstantIDError("The loaded checkpoint has no cross-attention layers this extension "
                             "can patch; load an SD 1.5 or SDXL checkpoint.")
    ctx = layers[0].context_dim
    name = {2048: "sdxl", 768: "sd15", 1024: "sd2"}.get(ctx, "unknown")
    return UNetFamily(name, ctx, len(layers))


def input_output_blocks(unet: torch.nn.Module):
    """``(input_blocks, middle_block, output_blocks)`` of an ldm/sgm UNet."""
    try:
        return unet.input_blocks, unet.middle_block, unet.output_blocks
    except AttributeError as exc:  # pragma: no cover - only with a foreign UNet class
        raise InstantIDError("The loaded model's UNet is not the webui's usual ldm/sgm UNet "
                             "(input_blocks / middle_block / output_blocks), so IdentityNet "
                             "cannot be attached to it.") from exc
