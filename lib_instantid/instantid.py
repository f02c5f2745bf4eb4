"""InstantID's keypoint hint for IdentityNet, drawn at each pass's own resolution.

As the official pipeline: the raw antelopev2 embedding (several photos averaged) goes through the
adapter's Resampler (``tokens.unit_tokens``); cond rows get those 16 tokens, uncond rows the
Resampler's output for a zero embedding - in the UNet's image attention and as IdentityNet's
context alike. IdentityNet's hint is the 5-point keypoint map of the face.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from .kps import kps_map_for


class KpsHint:
    """The keypoint map at the size of each call, cached per (size, device, dtype).

    ``kps`` are in the pixels of a source image of ``src_size`` (w, h); they are placed on the
    target as that image would be by "crop and resize" (scaled to cover, centred).
    """

    def __init__(self, kps: np.ndarray, src_size: Tuple[int, int]) -> None:
        self.kps = np.asarray(kps, dtype=np.float32)
        self.src_w, self.src_h = src_size
        self._cache: Dict[tuple, torch.Tensor] = {}

    def image(self, width: int, height: int) -> np.ndarray:
        return kps_map_for(self.kps, (self.src_w, self.src_h), (width, height))

    def __call__(self, height: int, width: int, device, dtype) -> torch.Tensor:
        key = (height, width, str(device), dtype)
        if key not in self._cache:
            img = torch.from_numpy(self.image(width, height)).permute(2, 0, 1)[None].float() / 255.0
            self._cache[key] = img.to(device=device, dtype=dtype)
        return self._cache[key]
