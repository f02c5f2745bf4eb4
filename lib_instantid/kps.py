"""InstantID keypoint map: the 5 face keypoints drawn as the InstantID ControlNet expects them.

The picture matches the official InstantID ``draw_kps``: on black, four "limbs" from the eyes and
mouth corners to the nose, each a filled ellipse 2*4 px thick in the colour of its first point,
dimmed to 60 %; then a filled circle of radius 10 px at every point in its own colour. Colours are
RGB. ``fit_kps`` maps keypoints found on the face image onto the generation size the way
"crop and resize" does (scale until the image covers the target, then centre crop).
"""

import math
from typing import Sequence

import cv2
import numpy as np

COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # eyes and mouth corners to the nose
STICK_WIDTH = 4
LIMB_DIM = 0.6
POINT_RADIUS = 10


def _check_kps(kps) -> np.ndarray:
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        raise ValueError("face keypoints must be 5 finite (x, y) points, got shape %s" % (kps.shape,))
    return kps


def draw_kps(width: int, height: int, kps) -> np.ndarray:
    """RGB uint8 image ``height`` x ``width`` with the keypoint drawing; kps in its pixel coordinates."""
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError("keypoint map size must be positive, got %dx%d" % (width, height))
    kps = _check_kps(kps)
    limbs = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in LIMBS:
        (xa, ya), (xb, yb) = kps[a], kps[b]
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(math.hypot(xa - xb, ya - yb) / 2)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        outline = cv2.ellipse2Poly(centre, (half_length, STICK_WIDTH), angle, 0, 360, 1)
        cv2.fillConvexPoly(limbs, outline, COLORS[a])
    # 255 * 0.6 = 153 exactly; multiplying in float and truncating keeps that
    canvas = (limbs.astype(np.float32) * LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(kps, COLORS):
        cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, color, -1)
    return canvas


def fit_kps(kps, src_w: float, src_h: float, dst_w: float, dst_h: float) -> np.ndarray:
    """Keypoints of a ``src_w`` x ``src_h`` image after "crop and resize" to ``dst_w`` x ``dst_h``."""
    kps = _check_kps(kps)
    if min(src_w, src_h, dst_w, dst_h) <= 0:
        raise ValueError("image sizes must be positive")
    scale = max(dst_w / float(src_w), dst_h / float(src_h))
    offset = np.array([(dst_w - src_w * scale) / 2.0, (dst_h - src_h * scale) / 2.0])
    return (kps * scale + offset).astype(np.float32)


def kps_map_for(kps, src_size: Sequence[int], dst_size: Sequence[int]) -> np.ndarray:
    """Keypoint map of ``dst_size`` (w, h) for kps found on an image of ``src_size`` (w, h)."""
    (src_w, src_h), (dst_w, dst_h) = src_size, dst_size
    return draw_kps(dst_w, dst_h, fit_kps(kps, src_w, src_h, dst_w, dst_h))

