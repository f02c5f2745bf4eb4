"""Per-layer IP weights by "weight type", the named presets users know from ComfyUI_IPAdapter_plus.

The presets are stated per *block*: the index ``t`` of a UNet block that holds a SpatialTransformer,
counted in execution order (input blocks, the middle block, output blocks). SD 1.5 has 16 such blocks
(0-5 = input blocks 1, 2, 4, 5, 7, 8; 6 = middle; 7-15 = output blocks 3-11); SDXL has 11
(0, 1 = input 4, 5; 2, 3 = input 7, 8; 4 = middle; 5-7 = output 0-2; 8-10 = output 3-5). Every
transformer layer inside a block gets that block's value (an SDXL block holds 2 or 10 layers).

``layer_weights`` returns the absolute IP weight of every cross-attention layer (indexed by the
layer index k of ``unet_layers.cross_attention_layers``), to be used as ``AttentionUnit.layer_scales``
with a unit weight of 1. With ``w`` the weight, ``wc`` the composition weight and ``L`` the number of
blocks:

- linear: ``w`` everywhere; ease in: ``w(0.05 + 0.95(1 - t/L))``; ease out: ``w(0.05 + 0.95 t/L)``;
  ease in-out: ``w(0.05 + 0.95(1 - |t - L/2| / (L/2)))``; reverse in-out: ``w(0.05 + 0.95|t - L/2| / (L/2))``;
- weak input / weak middle / weak output: ``0.2w`` in that part of the UNet, ``w`` elsewhere;
  strong middle: ``0.2w`` in input and output blocks, ``w`` in the middle block;
- the style/composition presets give listed blocks a value and every other block 0 (table below).

The SDXL tables apply to a UNet with 11 attention blocks, the SD 1.5 tables to any other (SD 2.x has
SD 1.5's 16 blocks). The middle block is patched like every other block, as the presets intend.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

from .errors import InputError
from .unet_layers import CrossAttnLayer

WEIGHT_TYPES: List[str] = [
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out",
    "weak input", "weak middle", "weak output", "strong middle",
    "style transfer", "composition", "strong style transfer",
    "style and composition", "strong style and composition",
]

SDXL_BLOCKS = 11
_GROUP_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def _block_key(path: str) -> Tuple[int, int]:
    parts = path.split(".")
    group = _GROUP_ORDER[parts[0]]
    return (group, 0) if parts[0] == "middle_block" else (group, int(parts[1]))


def block_indices(layers: Sequence[CrossAttnLayer]) -> List[int]:
    """The block index t of every layer, indexed by the layer index k."""
    keys = {layer.index: _block_key(layer.path) for layer in layers}
    rank = {key: t for t, key in enumerate(sorted(set(keys.values())))}
    out = [0] * len(layers)
    for k, key in keys.items():
        out[k] = rank[key]
    return out


# Block tables of the style/composition presets: (SDXL, SD 1.5); each maps t -> a function of (w, wc).
_W: Callable[[float, float], float] = lambda w, wc: w  # noqa: E731
_WC: Callable[[float, float], float] = lambda w, wc: wc  # noqa: E731


def _table(blocks, value) -> Dict[int, Callable[[float, float], float]]:
    return {t: value for t in blocks}


_SD15_STYLE = [0, 1, 2, 3, *range(9, 16)]
_SD15_ALL_BUT_COMPOSITION = [0, 1, 2, 3, *range(6, 16)]
_SDXL_ALL_BUT_COMPOSITION = [0, 1, 2, *range(4, 11)]

_TABLES: Dict[str, Tuple[Dict[int, Callable], Dict[int, Callable]]] = {
    "style transfer": (_table([6], _W), _table(_SD15_STYLE, _W)),
    "composition": (_table([3], _W), {4: lambda w, wc: 0.25 * w, 5: _W}),
    "strong style transfer": (_table(_SDXL_ALL_BUT_COMPOSITION, _W), _table(_SD15_ALL_BUT_COMPOSITION, _W)),
    "style and composition": ({3: _WC, 6: _W},
                              {**_table(_SD15_STYLE, _W), 4: lambda w, wc: 0.25 * wc, 5: _WC}),
    "strong style and composition": ({**_table(_SDXL_ALL_BUT_COMPOSITION, _W), 3: _WC},
                                     {**_table(_SD15_ALL_BUT_COMPOSITION, _W), 4: _WC, 5: _WC}),
}


def _block_weight(kind: str, t: int, blocks: int, part: str, w: float, wc: float) -> float:
    half = blocks / 2
    if kind == "linear":
        return w
    if kind == "ease in":
        return w * (0.05 + 0.95 * (1 - t / blocks))
    if kind == "ease out":
        return w * (0.05 + 0.95 * (t / blocks))
    if kind == "ease in-out":
        return w * (0.05 + 0.95 * (1 - abs(t - half) / half))
    if kind == "reverse in-out":
        return w * (0.05 + 0.95 * (abs(t - half) / half))
    if kind.startswith("weak "):
        return 0.2 * w if part == kind[len("weak "):] else w
    if kind == "strong middle":
        return w if part == "middle" else 0.2 * w
    sdxl, sd15 = _TABLES[kind]
    value = (sdxl if blocks == SDXL_BLOCKS else sd15).get(t)
    return 0.0 if value is None else float(value(w, wc))


def normalise_weight_type(weight_type: str, field: str = "weight_type") -> str:
    """The canonical name of ``weight_type`` (case and surrounding spaces ignored); InputError if unknown."""
    kind = " ".join(str(weight_type).split()).lower()
    if kind not in WEIGHT_TYPES:
        raise InputError(f"Field '{field}' has an unknown weight type {str(weight_type)!r}; use one of: "
                         + ", ".join(WEIGHT_TYPES) + ".")
    return kind


def layer_weights(layers: Sequence[CrossAttnLayer], weight_type: str, weight: float = 1.0,
                  composition_weight: float = 1.0, field: str = "weight_type") -> List[float]:
    """The absolute IP weight of every cross-attention layer (list index = layer index k)."""
    kind = normalise_weight_type(weight_type, field)
    if not layers:
        return []
    t_of = block_indices(layers)
    blocks = max(t_of) + 1
    out = [0.0] * len(layers)
    for layer in layers:
        out[layer.index] = float(_block_weight(kind, t_of[layer.index], blocks, layer.block,
                                               float(weight), float(composition_weight)))
    return out
