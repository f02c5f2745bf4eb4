"""The CLIP image encoder the IP-Adapter family feeds on, and its preprocessing.

``CLIPVisionEncoder`` is a plain ViT whose parameter names are those of transformers'
``CLIPVisionModelWithProjection``, so the published files (h94/IP-Adapter ``image_encoder``, the
ComfyUI renames, sd-webui-controlnet's ``clip_h.pth`` / ``clip_g.pth``, a full ``CLIPModel``)
load into it strictly without transformers. The files carry no config: sizes come from tensor
shapes, the head count and activation from a table (overridable).

Standard IP-Adapters use ``image_embeds`` (projected, post-layernormed CLS token); plus, full-face
and FaceID-plus use the penultimate hidden states (``hidden_states[-2]`` in transformers: the
output of the second-to-last layer, no post-layernorm). Their uncond input is the encoder run on
``zero_pixels()``, an all-zero image in normalised space.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFileError
from .weights import load_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HEADS_BY_WIDTH = {1280: 16, 1664: 16, 1024: 16, 768: 12}
# OpenAI's own ViT-B / ViT-L use quick_gelu; the LAION ViT-H / bigG the IP-Adapters use exact gelu.
ACT_BY_WIDTH = {768: "quick_gelu", 1024: "quick_gelu"}
NAMES = {(1280, 32): "ViT-H", (1664, 48): "ViT-bigG", (1024, 24): "ViT-L", (768, 12): "ViT-B"}

_PREFIXES = ("vision_model.", "visual_projection.")
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_E = "vision_model.embeddings."

# The published encoders: (needs, input width) -> (name, repository file, name to save it as).
_VIT_H = ("ViT-H-14", "h94/IP-Adapter models/image_encoder/model.safetensors",
          "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
_VIT_BIGG = ("ViT-bigG-14", "h94/IP-Adapter sdxl_models/image_encoder/model.safetensors",
             "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors")
KNOWN_ENCODERS = {("clip_embeds", 1024): _VIT_H, ("clip_hidden", 1280): _VIT_H,
                  ("clip_embeds", 1280): _VIT_BIGG, ("clip_hidden", 1664): _VIT_BIGG}


# ----------------------------------------------------------------------------------------------
# Configuration from shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    image_size: int
    projection: int          # 0: no visual_projection (a CLIPVisionModel without it)
    act: str = "gelu"        # gelu | quick_gelu
    eps: float = 1e-5


@dataclass(frozen=True)
class EncoderDesc:
    name: str                # ViT-H-14, ViT-bigG-14, ViT-L-14, ... or "ViT (W wide, N layers)"
    hidden: int              # width of the hidden states (clip_hidden adapters)
    projection: int          # width of image_embeds (clip_embeds adapters); 0 if none
    layers: int


def _shape(shapes: Mapping, key: str) -> Tuple[int, ...]:
    return tuple(shapes[key].shape)


def config_from_shapes(shapes: Mapping, heads: Optional[int] = None, act: Optional[str] = None) -> VisionConfig:
    """A VisionConfig from key -> anything with ``.shape`` (tensors or weights.TensorInfo).

    Raises KeyError / ValueError when the keys are not those of a CLIP vision model.
    """
    hidden = _shape(shapes, _E + "class_embedding")[0]
    patch = _shape(shapes, _E + "patch_embedding.weight")[-1]
    positions = _shape(shapes, _E + "position_embedding.weight")[0]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise ValueError(f"{positions} positions is not a square grid plus a class token")
    layers = len({int(m.group(1)) for k in shapes for m in [_LAYER.match(k)] if m})
    if layers == 0:
        raise ValueError("no encoder layers")
    inter = _shape(shapes, "vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    proj = _shape(shapes, "visual_projection.weight")[0] if "visual_projection.weight" in shapes else 0
    if heads is None:
        heads = HEADS_BY_WIDTH.get(hidden) or max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"width {hidden} does not split into {heads} heads")
    act = act or ACT_BY_WIDTH.get(hidden, "gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"unknown activation {act!r}")
    return VisionConfig(hidden, layers, heads, inter, patch, grid * patch, proj, act)


def describe_encoder(infos: Mapping) -> Optional[EncoderDesc]:
    """Name and widths of a CLIP image encoder from its keys and shapes; None if it is not one."""
    try:
        cfg = config_from_shapes(infos)
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    base = NAMES.get((cfg.hidden, cfg.layers))
    if base is None:
        name = f"ViT ({cfg.hidden} wide, {cfg.layers} layers)"
    else:
        name = f"{base}-{cfg.patch}" + ("" if cfg.image_size == 224 else f"-{cfg.image_size}")
    return EncoderDesc(name, cfg.hidden, cfg.projection, cfg.layers)


# ----------------------------------------------------------------------------------------------
# The model (transformers CLIPVisionModelWithProjection parameter names)
# ----------------------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch) ** 2 + 1, cfg.hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class _Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.quick = cfg.act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class _Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)  # sic, as in transformers
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)


class CLIPVisionEncoder(nn.Module):
    """CLIP ViT image tower + visual projection, loadable from transformers-keyed state dicts."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = _VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden, cfg.projection, bias=False) if cfg.projection else None

    def forward(self, pixel_values: torch.Tensor, need_embeds: bool = True
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """pixel_values [B,3,S,S] (normalised) -> (image_embeds [B,proj], penultimate [B,T,hidden]).

        image_embeds is None when need_embeds is False (the last layer is then skipped) or the
        encoder has no projection.
        """
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.to(device=weight.device, dtype=weight.dtype)))
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        if not need_embeds or self.visual_projection is None:
            return None, penultimate
        last = layers[-1](x)
        return self.visual_projection(vm.post_layernorm(last[:, 0])), penultimate


# ----------------------------------------------------------------------------------------------
# Preprocessing (transformers CLIPImageProcessor defaults, PIL + numpy)
# ----------------------------------------------------------------------------------------------


def preprocess(image, size: int = 224) -> torch.Tensor:
    """RGB uint8 array [H,W,3] (or a PIL image) -> normalised pixels [1,3,size,size], float32.

    Shortest side resized to ``size`` (PIL bicubic; the other side truncated, as transformers
    does), center crop, /255, OpenAI CLIP mean/std. Crops non-square content, as the official code.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    arr = np.asarray(image.resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top:top + size, left:left + size]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def zero_pixels(size: int = 224) -> torch.Tensor:
    """The all-zero normalised image the official plus / FaceID-plus code encodes as uncond."""
    return torch.zeros(1, 3, size, size)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _not_clip(path: str, detail: str) -> ModelFileError:
    return ModelFileError(
        f"'{os.path.basename(path)}' is not a CLIP image encoder ({detail}). Put an IP-Adapter image "
        f"encoder in models/clip_vision, e.g. {_VIT_H[1]} saved as {_VIT_H[2]}.")


def load_clip_vision(path: str, device="cpu", dtype: torch.dtype = torch.float32,
                     heads: Optional[int] = None, act: Optional[str] = None) -> CLIPVisionEncoder:
    """A CLIPVisionEncoder from a .safetensors / .bin / .pth file (strict, in eval mode, no grad).

    Accepts transformers CLIPVisionModelWithProjection state dicts and full CLIPModel ones (text
    keys dropped). ``heads`` / ``act`` override the table defaults.
    """
    data = load_file(path)
    sd = {k: v for k, v in data.items()
          if isinstance(v, torch.Tensor) and str(k).startswith(_PREFIXES)
          and k != "vision_model.embeddings.position_ids"}
    open_clip = any(str(k).startswith("visual.") for k in data)
    del data
    if not sd:
        detail = "it is in open_clip's layout" if open_clip else "it has no vision_model.* weights"
        raise _not_clip(path, detail)
    try:
        cfg = config_from_shapes(sd, heads, act)
    except (KeyError, ValueError, IndexError) as exc:
        raise _not_clip(path, f"incomplete or unknown layout: {exc}") from None
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    for key in list(sd):
        sd[key] = sd.pop(key).to(device=device, dtype=dtype)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise _not_clip(path, "its weights do not match a CLIP ViT: "
                        + str(exc).splitlines()[-1].strip()[:200]) from None
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Matching adapters and encoders
# ----------------------------------------------------------------------------------------------


def encoder_fits(desc: EncoderDesc, needs: str, input_dim: int) -> bool:
    """Whether an encoder gives what an adapter's projection takes.

    needs: "clip_embeds" (input_dim = image_embeds width) or "clip_hidden" / "face+clip_hidden"
    (input_dim = hidden-state width, e.g. 1280; for FaceID-plus pass the perceiver's input width,
    not the 512 of the face embedding). Adapters that need no CLIP ("face") fit no encoder.
    """
    if needs == "clip_embeds":
        return desc.projection == input_dim
    if needs in ("clip_hidden", "face+clip_hidden"):
        return desc.hidden == input_dim
    return False


def _kind(needs: str) -> str:
    return "clip_embeds" if needs == "clip_embeds" else "clip_hidden"


def _wanted(needs: str, input_dim: int) -> str:
    what = "image embeds" if _kind(needs) == "clip_embeds" else "hidden states"
    known = KNOWN_ENCODERS.get((_kind(needs), input_dim))
    name = f"the CLIP {known[0]} image encoder" if known else "a CLIP image encoder"
    return f"{name} ({input_dim}-wide {what})"


def _fetch(needs: str, input_dim: int) -> str:
    known = KNOWN_ENCODERS.get((_kind(needs), input_dim))
    if known is None:
        return "Put a CLIP image encoder of that width in models/clip_vision."
    return f"Download {known[1]} and save it as models/clip_vision/{known[2]}."


def missing_encoder_message(needs: str, input_dim: int, folders: Iterable[str]) -> str:
    """The sentence shown when no encoder in the searched folders fits an adapter."""
    where = ", ".join(str(f) for f in folders) or "the model folders"
    return f"This adapter needs {_wanted(needs, input_dim)}, and none was found in {where}. " \
           + _fetch(needs, input_dim)


def mismatch_message(adapter_name: str, needs: str, input_dim: int, encoder_name: str,
                     encoder_desc: Optional[EncoderDesc]) -> str:
    """The sentence shown when the user picked an encoder the adapter cannot use."""
    if encoder_desc is None:
        got = "is not a CLIP image encoder"
    else:
        width = encoder_desc.projection if _kind(needs) == "clip_embeds" else encoder_desc.hidden
        what = "image embeds" if _kind(needs) == "clip_embeds" else "hidden states"
        got = f"is {encoder_desc.name} ({width}-wide {what})"
    return (f"'{adapter_name}' needs {_wanted(needs, input_dim)}, but the selected encoder "
            f"'{encoder_name}' {got}. Select a matching encoder or leave the choice on automatic; "
            "if you have none: " + _fetch(needs, input_dim))
