"""The image/face tokens of one unit: its adapter's projection of the references (cond) and of the
empty input (uncond), as the reference implementations compute them.

- CLIP image embeds (base, light, vit-G, SDXL): uncond = projection of zeros.
- CLIP penultimate hidden states (plus, plus-face, full-face): uncond = projection of the hidden
  states of an all-zero normalised image, computed with the encoder actually used.
- face embeddings (FaceID, portrait, InstantID): uncond = projection of a zero embedding.
- FaceID-Plus: face embedding + CLIP hidden states of the aligned face crop; v2 adds the shortcut
  ``x + s_scale * perceiver(x, clip)``; uncond from zeros and the zero image's hidden states.
A negative image, where given, replaces the uncond source of the CLIP part.

Several references: ``average`` averages the inputs before the projection; ``concat`` projects each
and concatenates the tokens (what the official portrait model does). The uncond tokens always have
the cond tokens' count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .adapters import LoadedAdapter
from .errors import InputError

COMBINES = ("auto", "average", "concat")


@dataclass
class References:
    """Encoded references of one unit; each field is stacked over the n reference images."""

    clip_embeds: Optional[torch.Tensor] = None     # [n, D]
    clip_hidden: Optional[torch.Tensor] = None     # [n, 257, H]
    faces: Optional[torch.Tensor] = None           # [n, 512]
    uncond_clip_embeds: Optional[torch.Tensor] = None   # [1, D]: zeros, or the negative image's
    uncond_clip_hidden: Optional[torch.Tensor] = None   # [1, 257, H]: zero image's, or the negative's


def resolve_combine(adapter: LoadedAdapter, combine: str) -> str:
    if combine not in COMBINES:
        raise InputError(f"Field 'combine' must be one of {', '.join(COMBINES)}, got {combine!r}.")
    if combine != "auto":
        return combine
    return "concat" if adapter.detected.variant.startswith("faceid_portrait") else "average"


def _run(proj, *inputs, **kwargs) -> torch.Tensor:
    param = next(proj.parameters())
    inputs = [x.to(param.device, param.dtype) for x in inputs]
    with torch.no_grad():
        return proj(*inputs, **kwargs).float().cpu()


def _cond_and_uncond(proj, cond_inputs, uncond_inputs, combine: str, n: int, **kwargs) -> torch.Tensor:
    """Project cond (n references) and uncond (one) inputs; returns [2, T, C]."""
    if combine == "average" or n == 1:
        cond = _run(proj, *[x.mean(dim=0, keepdim=True) for x in cond_inputs], **kwargs)
        uncond = _run(proj, *uncond_inputs, **kwargs)
    else:                                  # each reference's tokens, one after the other
        cond = _run(proj, *cond_inputs, **kwargs)
        cond = cond.reshape(1, -1, cond.shape[-1])
        uncond = _run(proj, *[u.expand(n, *u.shape[1:]) for u in uncond_inputs], **kwargs)
        uncond = uncond.reshape(1, -1, uncond.shape[-1])
    return torch.cat([cond, uncond])


def unit_tokens(adapter: LoadedAdapter, refs: References, combine: str = "auto",
                s_scale: float = 1.0) -> torch.Tensor:
    """[2, T, C] tokens (kind 0 = cond, 1 = uncond) of one unit."""
    kind, needs = adapter.info.kind, adapter.detected.needs
    combine = resolve_combine(adapter, combine)
    proj = adapter.proj
    if needs == "clip_embeds":
        x, u = refs.clip_embeds, refs.uncond_clip_embeds
        return _cond_and_uncond(proj, [x], [u if u is not None else torch.zeros_like(x[:1])], combine, len(x))
    if needs == "clip_hidden":
        x, u = refs.clip_hidden, refs.uncond_clip_hidden
        return _cond_and_uncond(proj, [x], [u], combine, len(x))
    if needs == "face" and kind == "faceid":
        faces = refs.faces
        if combine == "concat" and len(faces) > 1:   # portrait: 16 tokens per face, concatenated
            cond = _run(proj, faces[None])
            uncond = _run(proj, torch.zeros_like(faces)[None])
            return torch.cat([cond, uncond])
        return _cond_and_uncond(proj, [faces], [torch.zeros_like(faces[:1])], "average", len(faces))
    if needs == "face":                               # Resampler on face embeddings (InstantID)
        faces = refs.faces
        x = faces.mean(dim=0, keepdim=True)[None] if combine == "average" else faces[None]
        cond = _run(proj, x)
        uncond = _run(proj, torch.zeros_like(x))
        return torch.cat([cond, uncond])
    if needs == "face+clip_hidden":
        shortcut = adapter.detected.variant == "faceid_plusv2"
        kwargs = {"shortcut": shortcut, "scale": float(s_scale)}
        faces, hidden = refs.faces, refs.clip_hidden
        return _cond_and_uncond(proj, [faces, hidden], [torch.zeros_like(faces[:1]), refs.uncond_clip_hidden],
                                combine, len(faces), **kwargs)
    raise InputError(f"'{adapter.name}' needs inputs of kind '{needs}', which this unit cannot provide.")
