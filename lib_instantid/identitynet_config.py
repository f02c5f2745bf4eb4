"""IdentityNet's configuration: the published config, parsing a diffusers ControlNet config,
inferring one from tensor shapes, and where each residual goes in the webui's UNet."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .errors import ModelFileError

# The published InstantID ControlNetModel/config.json (InstantX/InstantID), minus bookkeeping keys.
INSTANTID_CONFIG: Dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}

_DETECT_KEYS = ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight")
_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")


def is_identitynet_state_dict(keys: Iterable[str]) -> bool:
    """True when ``keys`` look like a diffusers-format ControlNet (InstantID's IdentityNet is one)."""
    keyset = set(keys)
    return all(k in keyset for k in _DETECT_KEYS)


def _as_list(value: Any, n: int, name: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ModelFileError(
                f"The ControlNet config lists {len(value)} values for '{name}' but has {n} down blocks."
            )
        return list(value)
    return [value] * n


class Arch(NamedTuple):
    in_channels: int
    channels: List[int]
    down_types: List[str]
    layers: int
    depths: List[int]
    heads: List[int]
    mid_depth: int
    context_dim: int
    linear_proj: bool
    add_embed_in: Optional[int]
    groups: int
    eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    hint_channels: int
    hint_widths: List[int]
    downsample_padding: int
    mid_scale: float
    upcast_attention: bool
    global_pool: bool
    bgr: bool


def parse_config(config: Mapping[str, Any]) -> Arch:
    """Check a diffusers ControlNetModel config dict and return what the module needs."""
    if not isinstance(config, Mapping):
        raise ModelFileError("The ControlNet config must be a JSON object (a dict).")
    cfg = dict(config)

    def get(name: str, default: Any) -> Any:
        value = cfg.get(name, default)
        return default if value is None else value

    def reject(name: str, value: Any, allowed: Sequence[Any]) -> None:
        if value not in allowed:
            raise ModelFileError(
                f"This ControlNet uses {name}={value!r}, which IdentityNet does not support "
                f"(supported: {', '.join(repr(a) for a in allowed)})."
            )

    reject("act_fn", get("act_fn", "silu"), ["silu"])
    reject("class_embed_type", cfg.get("class_embed_type"), [None])
    reject("num_class_embeds", cfg.get("num_class_embeds"), [None])
    reject("encoder_hid_dim_type", cfg.get("encoder_hid_dim_type"), [None])
    reject("resnet_time_scale_shift", get("resnet_time_scale_shift", "default"), ["default"])
    oca = get("only_cross_attention", False)
    reject("only_cross_attention", any(oca) if isinstance(oca, (list, tuple)) else bool(oca), [False])
    reject("addition_embed_type", cfg.get("addition_embed_type"), [None, "text_time"])
    reject("mid_block_type", get("mid_block_type", "UNetMidBlock2DCrossAttn"), ["UNetMidBlock2DCrossAttn"])
    reject(
        "controlnet_conditioning_channel_order",
        get("controlnet_conditioning_channel_order", "rgb"),
        ["rgb", "bgr"],
    )

    channels = [int(c) for c in get("block_out_channels", [320, 640, 1280, 1280])]
    n = len(channels)
    down_types = list(get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    if len(down_types) != n or n == 0:
        raise ModelFileError(
            "The ControlNet config has a different number of block_out_channels and down_block_types."
        )
    for t in down_types:
        reject("down_block_types entry", t, list(_DOWN_TYPES))

    heads = get("num_attention_heads", None) or get("attention_head_dim", 8)
    heads = [int(h) for h in _as_list(heads, n, "attention_head_dim")]
    depths = _as_list(get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    if any(isinstance(d, (list, tuple)) for d in depths):
        raise ModelFileError("Per-layer transformer_layers_per_block lists are not supported by IdentityNet.")
    depths = [int(d) for d in depths]
    layers = get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        raise ModelFileError("Per-block layers_per_block lists are not supported by IdentityNet.")
    groups = int(get("norm_num_groups", 32))
    for i, (c, h, t) in enumerate(zip(channels, heads, down_types)):
        if c % groups:
            raise ModelFileError(f"The ControlNet config has {c} channels, not divisible by norm_num_groups={groups}.")
        if t == "CrossAttnDownBlock2D" and (h <= 0 or c % h):
            raise ModelFileError(f"The ControlNet config has {c} channels in block {i}, not divisible into {h} heads.")
    if channels[-1] % heads[-1]:
        raise ModelFileError("The ControlNet config's middle block channels are not divisible by its head count.")

    add_embed_in = None
    if cfg.get("addition_embed_type") == "text_time":
        add_embed_in = cfg.get("projection_class_embeddings_input_dim")
        if not add_embed_in:
            raise ModelFileError(
                "The ControlNet config uses addition_embed_type 'text_time' without "
                "projection_class_embeddings_input_dim."
            )
        add_embed_in = int(add_embed_in)

    hint_widths = [int(c) for c in get("conditioning_embedding_out_channels", [16, 32, 96, 256])]
    if not hint_widths:
        raise ModelFileError("The ControlNet config has an empty conditioning_embedding_out_channels.")

    return Arch(
        in_channels=int(get("in_channels", 4)),
        channels=channels,
        down_types=down_types,
        layers=int(layers),
        depths=depths,
        heads=heads,
        mid_depth=depths[-1],
        context_dim=int(get("cross_attention_dim", 1280)),
        linear_proj=bool(get("use_linear_projection", False)),
        add_embed_in=add_embed_in,
        groups=groups,
        eps=float(get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)),
        hint_channels=int(get("conditioning_channels", 3)),
        hint_widths=hint_widths,
        downsample_padding=int(get("downsample_padding", 1)),
        mid_scale=float(get("mid_block_scale_factor", 1)),
        upcast_attention=bool(get("upcast_attention", False)),
        global_pool=bool(get("global_pool_conditions", False)),
        bgr=get("controlnet_conditioning_channel_order", "rgb") == "bgr",
    )


class ResidualTarget(NamedTuple):
    """Where one down residual goes in the ldm/sgm UNet the webui runs."""

    index: int  # position in the list forward() returns
    ldm_block: str  # "input_blocks.{index}" under model.diffusion_model
    diffusers_source: str  # the diffusers module whose output this residual mirrors
    channels: int
    downscale: int  # latent size divided by this factor


def residual_targets(config: Mapping[str, Any]) -> List[ResidualTarget]:
    """Describe, for each down residual, the UNet input block it belongs to.

    Residual ``i`` belongs to ``input_blocks[i]`` of the ldm/sgm UNet: index 0 is the ``conv_in``
    output, then come the (resnet[, transformer]) pairs of each level, with the level's
    downsampler after them (no downsampler after the last level). SDXL: 9 residuals
    (``input_blocks.0`` .. ``input_blocks.8``); SD1.5: 12.

    How to apply them (same as diffusers' UNet): run the input blocks unchanged, and add residual
    ``i`` to the skip tensor ``hs[i]`` saved after ``input_blocks[i]`` - only to the stored skip,
    not to the tensor fed to the next input block. Add the mid residual to the output of
    ``middle_block`` (that sum does flow into the output blocks).
    """
    arch = parse_config(config)
    out = [ResidualTarget(0, "input_blocks.0", "conv_in", arch.channels[0], 1)]
    scale = 1
    for b, ch in enumerate(arch.channels):
        for j in range(arch.layers):
            src = f"down_blocks.{b}.attentions.{j}" if arch.down_types[b] == "CrossAttnDownBlock2D" \
                else f"down_blocks.{b}.resnets.{j}"
            out.append(ResidualTarget(len(out), f"input_blocks.{len(out)}", src, ch, scale))
        if b < len(arch.channels) - 1:
            scale *= 2
            out.append(
                ResidualTarget(len(out), f"input_blocks.{len(out)}", f"down_blocks.{b}.downsamplers.0", ch, scale)
            )
    return out


def _shape(v: Any) -> Tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def infer_config(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rebuild a diffusers ControlNet config from the tensor shapes of a state dict.

    Values are tensors (or anything with ``.shape``, or plain shape tuples). Head counts are not
    stored in the weights; the standard choices are used: 64-wide heads (SDXL, SD2.x, anything
    with an added embedding) and 8 heads for SD1.x (cross-attention width 768). Norm settings
    take the diffusers defaults (32 groups, eps 1e-5). Raises :class:`ModelFileError` if the keys
    are not a ControlNet.
    """
    keys = set(state_dict.keys())
    if not is_identitynet_state_dict(keys):
        raise ModelFileError(
            "This file is not a diffusers-format ControlNet: 'controlnet_cond_embedding.conv_in.weight' is missing."
        )
    try:
        def shp(k: str) -> Tuple[int, ...]:
            return _shape(state_dict[k])

        def indices(prefix: str) -> List[int]:
            found = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
            return sorted(found)

        blocks = indices("down_blocks.")
        channels = [shp(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in blocks]
        layers = len(indices("down_blocks.0.resnets."))
        types, depths, ctx_dim, linear = [], [], None, None
        for b in blocks:
            pre = f"down_blocks.{b}.attentions.0."
            if any(k.startswith(pre) for k in keys):
                types.append("CrossAttnDownBlock2D")
                depths.append(len(indices(pre + "transformer_blocks.")))
                ctx_dim = shp(pre + "transformer_blocks.0.attn2.to_k.weight")[1]
                linear = len(shp(pre + "proj_in.weight")) == 2
            else:
                types.append("DownBlock2D")
                depths.append(1)
        mid_depth = len(indices("mid_block.attentions.0.transformer_blocks."))
        if ctx_dim is None:
            ctx_dim = shp("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(shp("mid_block.attentions.0.proj_in.weight")) == 2
        if mid_depth != depths[-1]:
            if types[-1] == "DownBlock2D":
                depths[-1] = mid_depth
            else:
                raise ModelFileError(
                    "This ControlNet's middle block depth differs from its last down block; it is not supported."
                )
        has_add = "add_embedding.linear_1.weight" in keys
        heads = [8] * len(channels) if (ctx_dim == 768 and not has_add) else [max(c // 64, 1) for c in channels]
        hint = [shp("controlnet_cond_embedding.conv_in.weight")[0]]
        for i in indices("controlnet_cond_embedding.blocks."):
            if i % 2 == 1:
                hint.append(shp(f"controlnet_cond_embedding.blocks.{i}.weight")[0])
        cfg: Dict[str, Any] = {
            "in_channels": shp("conv_in.weight")[1],
            "block_out_channels": channels,
            "down_block_types": types,
            "layers_per_block": layers,
            "transformer_layers_per_block": depths,
            "attention_head_dim": heads,
            "cross_attention_dim": ctx_dim,
            "use_linear_projection": bool(linear),
            "conditioning_channels": shp("controlnet_cond_embedding.conv_in.weight")[1],
            "conditioning_embedding_out_channels": hint,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "addition_embed_type": None,
        }
        if has_add:
            cfg["addition_embed_type"] = "text_time"
            cfg["addition_time_embed_dim"] = 256
            cfg["projection_class_embeddings_input_dim"] = shp("add_embedding.linear_1.weight")[1]
        return cfg
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelFileError(
            f"This ControlNet file is incomplete or of an unknown layout (could not read {exc}); "
            "put its config.json next to it or use the original InstantID file."
        ) from None
