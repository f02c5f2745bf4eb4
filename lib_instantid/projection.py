"""Image-projection modules of every IP-Adapter family, with the parameter names of the published files.

An adapter file holds an ``image_proj`` dict that turns an image or face embedding into the extra
tokens the UNet's cross-attention layers attend to. The modules here are written from the published
descriptions of each family; their parameter names and shapes match the ``image_proj`` dicts, so
those load with ``strict=True``:

- ``ImageProjModel`` (base, light, vit-G, sdxl, sdxl_vit-h): CLIP image_embeds [B,D] -> [B,4,C].
- ``Resampler`` (plus, plus-face, InstantID, faceid-portrait_sdxl_unnorm): CLIP hidden states
  [B,257,1280] or one face embedding [B,1,512] -> [B,16,C].
- ``MLPProjModel`` (full-face): CLIP hidden states [B,257,1280] -> [B,257,C].
- ``FaceIDProjModel`` (faceid, faceid-portrait): ArcFace [B,512] -> [B,T,C]; portrait faces
  [B,n,512] -> [B,n*16,C].
- ``ProjPlusModel`` (faceid-plus, faceid-plusv2): ArcFace [B,512] + CLIP hidden states of the face
  crop [B,257,1280] -> [B,4,C].

``build_image_proj`` reads the family and every size from the dict's keys and shapes, builds the
module and loads the dict into it. Variants that only the file name tells apart (plus vs plus-face,
faceid-plus vs plusv2, InstantID vs portrait_sdxl_unnorm) get the same module here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFileError

DIM_HEAD = 64  # every published Resampler / perceiver uses 64-wide attention heads
CLIP_HIDDEN_TOKENS = 257  # ViT-H/14 at 224 px: 16*16 patches + the class token


@dataclass(frozen=True)
class ProjInfo:
    """What a built projection expects and produces.

    kind: "image_proj" | "resampler" | "mlp_full" | "faceid" | "faceid_plus".
    num_tokens: tokens per image (per face for "faceid"; full-face passes all 257 CLIP tokens through).
    input_kind: "clip_embeds" | "clip_hidden" | "face_embedding" | "face_embedding+clip_hidden".
    input_dim: width of the main input (CLIP embed/hidden width, or the face-embedding width).
    output_dim: width of each token (the UNet's cross-attention dim).
    clip_hidden_dim: width of the CLIP hidden states, for "faceid_plus" only.
    """

    kind: str
    num_tokens: int
    input_kind: str
    input_dim: int
    output_dim: int
    clip_hidden_dim: Optional[int] = None


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _feed_forward(dim: int, inner_dim: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear; keys ``0.*``, ``1.weight``, ``3.weight``."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs, latents]; keys norm1, norm2, to_q, to_kv, to_out."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # for the inputs
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            self._split_heads(q), self._split_heads(k), self._split_heads(v)
        )
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _PerceiverStack(nn.Module):
    """proj_in -> depth x (attention + feed-forward, both residual) -> proj_out -> norm_out."""

    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_inner_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim, ff_inner_dim)])
            for _ in range(depth)
        )

    def _run(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# ----------------------------------------------------------------------------------------------
# The five families
# ----------------------------------------------------------------------------------------------


class ImageProjModel(nn.Module):
    """Base IP-Adapter: ``proj`` Linear(D, T*C) then LayerNorm ``norm`` per token."""

    def __init__(self, clip_dim: int, output_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Linear(clip_dim, num_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [B,D] -> [B,T,C]."""
        x = self.proj(image_embeds).reshape(-1, self.num_tokens, self.output_dim)
        return self.norm(x)


class Resampler(_PerceiverStack):
    """Perceiver resampler with learned queries ``latents`` [1,Q,dim] (plus, plus-face, InstantID)."""

    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_inner_dim: int):
        super().__init__(dim, depth, heads, embedding_dim, output_dim, ff_inner_dim)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,E] (a 2-D [B,E], e.g. one face embedding, is taken as N=1) -> [B,Q,C]."""
        if x.dim() == 2:
            x = x[:, None]
        latents = self.latents.expand(x.shape[0], -1, -1)
        return self._run(latents, x)


class MLPProjModel(nn.Module):
    """Full-face: Linear, GELU, Linear, LayerNorm applied to every CLIP hidden-state token."""

    def __init__(self, clip_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(clip_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, output_dim),
            nn.LayerNorm(output_dim),
        )

    def forward(self, clip_hidden: torch.Tensor) -> torch.Tensor:
        """clip_hidden [B,257,1280] -> [B,257,C]."""
        return self.proj(clip_hidden)


class FaceIDProjModel(nn.Module):
    """FaceID / portrait: proj.0 Linear(512,1024), GELU, proj.2 Linear(1024,T*C), ``norm`` LayerNorm."""

    def __init__(self, id_dim: int, hidden_dim: int, output_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Sequential(
            nn.Linear(id_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_tokens * output_dim),
        )
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """id_embeds [B,512] -> [B,T,C]; several faces [B,n,512] -> [B,n*T,C], face by face."""
        b = id_embeds.shape[0]
        x = self.proj(id_embeds).reshape(-1, self.num_tokens, self.output_dim)
        return self.norm(x).reshape(b, -1, self.output_dim)


class FacePerceiverResampler(_PerceiverStack):
    """The perceiver of FaceID-plus: same layers as ``Resampler`` but no latents of its own."""

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """latents [B,T,dim] (the FaceID tokens), x [B,N,E] (CLIP hidden states) -> [B,T,C]."""
        return self._run(latents, x)


class ProjPlusModel(nn.Module):
    """FaceID-plus / plusv2: FaceID tokens refined by a perceiver over the face crop's CLIP states."""

    def __init__(self, id_dim: int, hidden_dim: int, output_dim: int, num_tokens: int,
                 perceiver: FacePerceiverResampler):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Sequential(
            nn.Linear(id_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_tokens * output_dim),
        )
        self.norm = nn.LayerNorm(output_dim)
        self.perceiver_resampler = perceiver

    def forward(self, id_embeds: torch.Tensor, clip_hidden: torch.Tensor, shortcut: bool = False,
                scale: float = 1.0) -> torch.Tensor:
        """id_embeds [B,512], clip_hidden [B,257,1280] -> [B,T,C].

        v1 (shortcut False) returns the perceiver output; v2 (shortcut True) returns
        ``x + scale * perceiver(x, clip)`` where x are the FaceID tokens.
        """
        x = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.output_dim))
        out = self.perceiver_resampler(x, clip_hidden)
        return x + scale * out if shortcut else out


# ----------------------------------------------------------------------------------------------
# Building from a state dict
# ----------------------------------------------------------------------------------------------


def _layout_summary(sd: Dict[str, object]) -> str:
    names = sorted({k.split(".")[0] for k in sd})
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return shown or "nothing"


def _shape(sd: Dict[str, torch.Tensor], key: str, ndim: int) -> Tuple[int, ...]:
    if key not in sd:
        raise ModelFileError(
            f"This adapter's image_proj has no '{key}' tensor, so the file is incomplete or of an "
            f"unknown kind (its image_proj holds: {_layout_summary(sd)})."
        )
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ModelFileError(
            f"This adapter's image_proj tensor '{key}' has shape {list(shape)}, expected {ndim} "
            "dimensions; the file is damaged or of an unknown kind."
        )
    return shape


def _tokens(rows: int, width: int, key: str) -> int:
    if width <= 0 or rows % width:
        raise ModelFileError(
            f"This adapter's image_proj tensor '{key}' has {rows} rows, not a whole number of "
            f"{width}-wide tokens; the file is damaged or of an unknown kind."
        )
    return rows // width


def _perceiver(sd: Dict[str, torch.Tensor], prefix: str):
    """Read the sizes of a Resampler / FacePerceiverResampler stored under ``prefix``."""
    dim, embedding_dim = _shape(sd, prefix + "proj_in.weight", 2)
    output_dim = _shape(sd, prefix + "proj_out.weight", 2)[0]
    layer_key = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    layer_ids = {int(m.group(1)) for m in map(layer_key.match, sd) if m}
    depth = len(layer_ids)
    if depth == 0 or layer_ids != set(range(depth)):
        raise ModelFileError(
            f"This adapter's perceiver layers are missing or not numbered 0..n (found {sorted(layer_ids)})."
        )
    inner = _shape(sd, prefix + "layers.0.0.to_q.weight", 2)[0]
    heads = _tokens(inner, DIM_HEAD, prefix + "layers.0.0.to_q.weight")
    ff_inner_dim = _shape(sd, prefix + "layers.0.1.1.weight", 2)[0]
    return dict(dim=dim, depth=depth, heads=heads, embedding_dim=embedding_dim,
                output_dim=output_dim, ff_inner_dim=ff_inner_dim)


def _plan(sd: Dict[str, torch.Tensor]):
    """Decide the module from keys and shapes: returns (factory, ProjInfo)."""
    if "proj.3.weight" in sd:
        hidden, clip_dim = _shape(sd, "proj.0.weight", 2)
        c = _shape(sd, "proj.3.weight", 1)[0]
        info = ProjInfo("mlp_full", CLIP_HIDDEN_TOKENS, "clip_hidden", clip_dim, c)
        return (lambda: MLPProjModel(clip_dim, hidden, c)), info
    if "perceiver_resampler.proj_in.weight" in sd:
        hidden, id_dim = _shape(sd, "proj.0.weight", 2)
        c = _shape(sd, "norm.weight", 1)[0]
        t = _tokens(_shape(sd, "proj.2.weight", 2)[0], c, "proj.2.weight")
        p = _perceiver(sd, "perceiver_resampler.")
        if p["dim"] != c:
            raise ModelFileError(
                f"This FaceID-plus adapter's perceiver is {p['dim']} wide but its FaceID tokens are "
                f"{c} wide; the file is damaged or of an unknown kind."
            )
        info = ProjInfo("faceid_plus", t, "face_embedding+clip_hidden", id_dim, p["output_dim"],
                        clip_hidden_dim=p["embedding_dim"])
        return (lambda: ProjPlusModel(id_dim, hidden, c, t, FacePerceiverResampler(**p))), info
    if "latents" in sd:
        _, q, dim = _shape(sd, "latents", 3)
        p = _perceiver(sd, "")
        if p["dim"] != dim:
            raise ModelFileError(
                f"This adapter's Resampler latents are {dim} wide but proj_in gives {p['dim']}; "
                "the file is damaged or of an unknown kind."
            )
        # A 512-wide input is an ArcFace embedding (InstantID, portrait_sdxl_unnorm); else CLIP hidden states.
        kind = "face_embedding" if p["embedding_dim"] == 512 else "clip_hidden"
        info = ProjInfo("resampler", q, kind, p["embedding_dim"], p["output_dim"])
        return (lambda: Resampler(num_queries=q, **p)), info
    if "proj.2.weight" in sd and "norm.weight" in sd:
        hidden, id_dim = _shape(sd, "proj.0.weight", 2)
        c = _shape(sd, "norm.weight", 1)[0]
        t = _tokens(_shape(sd, "proj.2.weight", 2)[0], c, "proj.2.weight")
        info = ProjInfo("faceid", t, "face_embedding", id_dim, c)
        return (lambda: FaceIDProjModel(id_dim, hidden, c, t)), info
    if "proj.weight" in sd:
        rows, clip_dim = _shape(sd, "proj.weight", 2)
        c = _shape(sd, "norm.weight", 1)[0]
        t = _tokens(rows, c, "proj.weight")
        info = ProjInfo("image_proj", t, "clip_embeds", clip_dim, c)
        return (lambda: ImageProjModel(clip_dim, c, t)), info
    raise ModelFileError(
        "This file's image_proj has a layout no supported IP-Adapter, FaceID or InstantID model uses "
        f"(its top-level names are: {_layout_summary(sd)})."
    )


def build_image_proj(
    image_proj: Dict[str, torch.Tensor],
    cross_attention_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    file_name: Optional[str] = None,
) -> Tuple[nn.Module, ProjInfo]:
    """Build the projection module an adapter's ``image_proj`` dict belongs to and load the dict.

    Every size is read from the keys and shapes. Tensors are cast to ``dtype`` and moved to ``device``
    (None keeps them where they are, meta included, so full-size files can be checked without memory).
    Where no cast or move is needed the module shares storage with the dict. The module is returned
    in eval mode without gradients. Raises ModelFileError for an unknown layout, a missing or
    misshapen tensor, or tokens whose width is not ``cross_attention_dim`` (e.g. an SDXL adapter
    with an SD1.5 checkpoint); ``file_name``, when given, starts the message.
    """
    try:
        return _build(image_proj, cross_attention_dim, dtype, device)
    except ModelFileError as e:
        if file_name:
            raise ModelFileError(f"{file_name}: {e}") from None
        raise


def _build(image_proj, cross_attention_dim, dtype, device) -> Tuple[nn.Module, ProjInfo]:
    if not isinstance(image_proj, dict) or not image_proj:
        raise ModelFileError("This adapter file has an empty or unreadable image_proj section.")
    bad = [k for k, v in image_proj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(
            f"This adapter's image_proj entry '{bad[0]}' is not a tensor; "
            "the file is damaged or of an unknown kind."
        )
    factory, info = _plan(image_proj)
    if info.output_dim != cross_attention_dim:
        raise ModelFileError(
            f"This adapter makes {info.output_dim}-wide tokens but the model's cross-attention is "
            f"{cross_attention_dim} wide: it is meant for a different base model (SD1.5 uses 768, SDXL 2048)."
        )
    with torch.device("meta"):
        module = factory()
    # Parameters up front, so that assign=True installs them as they are on every torch >= 2.1.
    state = {}
    for k, v in image_proj.items():
        v = v.to(device=v.device if device is None else device, dtype=dtype)
        state[k] = nn.Parameter(v, requires_grad=False)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing / unexpected keys or shape mismatches
        detail = " ".join(str(e).split("\n", 1)[-1].split())
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise ModelFileError(
            f"This adapter's image_proj does not match the {info.kind} layout it looks like: {detail}"
        ) from None
    module.eval().requires_grad_(False)
    return module, info
