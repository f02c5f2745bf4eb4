"""Encoding a unit's reference images into what its adapter's projection takes.

CLIP encodings are cached by image content and encoder (``ModelCache.remember``): a repeated
generation with the same reference runs no encoder. FaceID uses insightface's buffalo_l pack (the
embeddings it was trained on), normed except for portrait "unnorm"; FaceID-Plus feeds CLIP the face
crop aligned by insightface, not the whole photo.
"""

from __future__ import annotations

import hashlib
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .adapters import LoadedAdapter
from .clip_vision import (EncoderDesc, encoder_fits, load_clip_vision, missing_encoder_message, mismatch_message,
                          preprocess, zero_pixels)
from .errors import FaceAnalysisError, ModelFileError
from .face_analysis import FaceAnalyzer, align_face_crop
from .model_cache import ModelCache
from .model_files import ModelEntry
from .tokens import References


def image_key(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest() + str(image.shape)


def _desc(entry: ModelEntry) -> EncoderDesc:
    d = entry.detected
    return EncoderDesc(d.variant, d.hidden, d.input_dim, 0)


def pick_encoder(encoders: Sequence[ModelEntry], adapter: LoadedAdapter, wanted: str,
                 folders: Sequence[str]) -> ModelEntry:
    """The encoder the user named (checked against the adapter) or the first that fits it."""
    needs, width = adapter.detected.needs.replace("face+", ""), adapter.detected.input_dim
    if wanted:
        for entry in encoders:
            if wanted in (entry.name, entry.path) or entry.name.rsplit(".", 1)[0] == wanted:
                if not encoder_fits(_desc(entry), needs, width):
                    raise ModelFileError(mismatch_message(adapter.name, needs, width, entry.name, _desc(entry)))
                return entry
        known = ", ".join(e.name for e in encoders) or "none"
        raise ModelFileError(f"Image encoder '{wanted}' was not found (available: {known}). "
                             + missing_encoder_message(needs, width, folders))
    for entry in encoders:
        if encoder_fits(_desc(entry), needs, width):
            return entry
    raise ModelFileError(missing_encoder_message(needs, width, folders))


class ClipEncoding:
    """Runs one image encoder, with its results cached across generations."""

    def __init__(self, entry: ModelEntry, device, dtype, cache: ModelCache) -> None:
        self.entry, self.device, self.dtype, self.cache = entry, device, dtype, cache

    def _model(self):
        return self.cache.get("clip_vision", self.entry.path,
                              lambda: load_clip_vision(self.entry.path, self.device, self.dtype),
                              self.device, self.dtype)

    def _run(self, pixels: torch.Tensor, hidden: bool) -> torch.Tensor:
        with torch.no_grad():
            embeds, penultimate = self._model()(pixels, need_embeds=not hidden)
        return (penultimate if hidden else embeds)[0].float().cpu()

    def encode(self, image: np.ndarray, hidden: bool) -> torch.Tensor:
        key = ("clip", self.entry.path, str(self.dtype), image_key(image), hidden)
        return self.cache.remember(key, lambda: self._run(preprocess(image), hidden))

    def zero_image(self, hidden: bool) -> torch.Tensor:
        key = ("clip", self.entry.path, str(self.dtype), "zero-pixels", hidden)
        return self.cache.remember(key, lambda: self._run(zero_pixels(), hidden))


def _faces(analyzer: FaceAnalyzer, images: Sequence[np.ndarray], mode: str, where: str):
    faces = []
    for i, img in enumerate(images):
        try:
            faces.append(analyzer.analyze(img, mode))
        except FaceAnalysisError as exc:
            label = "the reference image" if i == 0 else f"reference image {i + 1}"
            raise FaceAnalysisError(f"{where}, {label}: {exc}") from None
    return faces


def build_references(adapter: LoadedAdapter, images: List[np.ndarray], negative: Optional[np.ndarray],
                     face_mode: str, where: str, clip: Callable[[], ClipEncoding],
                     analyzer: Callable[[], FaceAnalyzer]) -> References:
    """References for ``adapter`` from the unit's images; ``clip``/``analyzer`` are made on demand."""
    needs = adapter.detected.needs
    refs = References()
    if needs in ("clip_embeds", "clip_hidden"):
        enc = clip()
        hidden = needs == "clip_hidden"
        stacked = torch.stack([enc.encode(img, hidden) for img in images])
        uncond = enc.encode(negative, hidden) if negative is not None else (
            enc.zero_image(True) if hidden else torch.zeros_like(stacked[0]))
        if hidden:
            refs.clip_hidden, refs.uncond_clip_hidden = stacked, uncond[None]
        else:
            refs.clip_embeds, refs.uncond_clip_embeds = stacked, uncond[None]
        return refs
    faces = _faces(analyzer(), images, face_mode, where)
    raw = adapter.detected.variant in ("instantid", "faceid_portrait_unnorm")
    vectors = [f.embedding if raw else f.normed_embedding for f in faces]
    refs.faces = torch.as_tensor(np.stack(vectors).astype(np.float32))
    if needs == "face+clip_hidden":
        enc = clip()
        crops = [align_face_crop(img, face, 224) for img, face in zip(images, faces)]
        refs.clip_hidden = torch.stack([enc.encode(crop, True) for crop in crops])
        refs.uncond_clip_hidden = (enc.encode(negative, True) if negative is not None else enc.zero_image(True))[None]
    return refs
