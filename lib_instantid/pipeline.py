"""From a request to a ready ``GenerationPatch``: find and load the models, analyse the faces,
project the embeddings, and describe what was done for the infotext.

Webui-agnostic: the glue passes the folders, the UNet, the device and dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .adapters import LoadedAdapter, load_adapter
from .errors import FaceAnalysisError, InstantIDError, ModelFileError
from .face_analysis import FaceAnalyzer, average_embeddings, check_antelopev2
from .identitynet import IdentityNet, infer_config
from .infotext import format_unit, unit_key
from .instantid import KpsHint, attention_unit, control_unit, face_tokens
from .model_cache import CACHE, ModelCache
from .model_files import BASE_LABEL, ModelEntry, scan, weights_path
from .params import Request, UnitParams
from .session import GenerationPatch, Schedule
from .unet_layers import unet_family
from .weights import load_file


@dataclass
class Locations:
    """Where model files are looked for, in order of preference."""

    adapter_dirs: List[str]
    controlnet_dirs: List[str]
    insightface_roots: List[str]


@dataclass
class Prepared:
    attention: list = field(default_factory=list)     # [(AttentionUnit, Schedule)]
    control: list = field(default_factory=list)       # [(ControlUnit, Schedule)]
    infotext: Dict[str, str] = field(default_factory=dict)
    kps_hints: List[KpsHint] = field(default_factory=list)

    def patch(self, unet: torch.nn.Module) -> GenerationPatch:
        return GenerationPatch(unet, self.attention, self.control)


# -- listing -------------------------------------------------------------------------------------

def list_models(locations: Locations, cache: ModelCache = CACHE) -> Dict[str, List[ModelEntry]]:
    adapters = [e for e in scan(locations.adapter_dirs, cache.detected) if e.detected.role == "adapter"]
    controlnets = [e for e in scan(locations.controlnet_dirs, cache.detected)
                   if e.detected.role == "controlnet" and e.detected.variant == "diffusers"]
    return {"adapters": adapters, "identitynets": controlnets}


def _pick(entries: Sequence[ModelEntry], wanted: str, what: str, hint: str, prefer=()) -> ModelEntry:
    if wanted:
        w = wanted.replace("\\", "/")
        for e in entries:
            stem = os.path.splitext(e.name)[0]
            if w in (e.name, stem, os.path.basename(e.name), os.path.basename(stem), e.path):
                return e
        known = ", ".join(e.name for e in entries) or "none"
        raise ModelFileError(f"{what} '{wanted}' was not found. Available: {known}. {hint}")
    for word in prefer:
        for e in entries:
            if word in e.name.lower():
                return e
    if not entries:
        raise ModelFileError(f"No {what} was found. {hint}")
    return entries[0]


# -- loading -------------------------------------------------------------------------------------

def load_identitynet(path: str, device, dtype) -> IdentityNet:
    state = load_file(weights_path(path))
    config = None
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if cfg_path and os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    if config is None:
        config = infer_config(state)
    return IdentityNet.from_state_dict(state, config, dtype=dtype, device=device)


def face_analyzer(locations: Locations, device: str, cache: ModelCache = CACHE) -> FaceAnalyzer:
    roots = [r for r in locations.insightface_roots if r]
    for root in roots:
        if os.path.isdir(os.path.join(root, "models", "antelopev2")):
            check_antelopev2(root)
            return cache.get("face_analyzer", root, lambda: FaceAnalyzer(root, device), device)
    check_antelopev2(roots[0])   # raises the message for the main location
    raise FaceAnalysisError("antelopev2 was not found.")  # pragma: no cover


# -- one unit ------------------------------------------------------------------------------------

def _faces(analyzer: FaceAnalyzer, unit: UnitParams, where: str):
    images = unit.all_images
    if not images:
        raise FaceAnalysisError(f"{where}: no face image was given; drop a photo of the face into the panel "
                                "(API: field 'image').")
    faces = []
    for i, img in enumerate(images):
        try:
            faces.append(analyzer.analyze(img, unit.face))
        except FaceAnalysisError as exc:
            label = "the face image" if i == 0 else f"extra face image {i}"
            raise FaceAnalysisError(f"{where}, {label}: {exc}") from None
    return images, faces


def _instantid(unit: UnitParams, where: str, entries, locations, unet_base: str, device, dtype,
               face_device: str, cache: ModelCache, out: Prepared) -> None:
    hint_files = ("Put InstantX's ip-adapter.bin (or ip-adapter_instant_id_sdxl.bin) into models/instantid/ "
                  "or models/ControlNet/.")
    entry = _pick([e for e in entries["adapters"] if e.detected.variant == "instantid"] or entries["adapters"],
                  unit.adapter, "InstantID adapter", hint_files, prefer=("instant",))
    if entry.detected.variant != "instantid":
        raise ModelFileError(f"{where}: '{entry.name}' is an IP-Adapter ({entry.detected.label}), not the "
                             "InstantID adapter. " + hint_files)
    if unet_base != "sdxl":
        raise InstantIDError(f"InstantID works only with SDXL checkpoints, but the loaded checkpoint is "
                             f"{BASE_LABEL.get(unet_base, unet_base)}. Load an SDXL checkpoint.")
    cn_entry = _pick([e for e in entries["identitynets"] if e.detected.base == "sdxl"], unit.identitynet,
                     "IdentityNet (InstantID ControlNet)",
                     "Put InstantX's ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) "
                     "into models/instantid/, or control_instant_id_sdxl.safetensors into models/ControlNet/.",
                     prefer=("instant", "identity"))
    adapter: LoadedAdapter = cache.get("adapter", entry.path, lambda: load_adapter(entry.path, entry.name))
    net = cache.get("identitynet", cn_entry.path, lambda: load_identitynet(cn_entry.path, device, dtype),
                    device, dtype)
    analyzer = face_analyzer(locations, face_device, cache)
    images, faces = _faces(analyzer, unit, where)
    embedding = average_embeddings(faces)
    if unit.pose_image is not None:
        pose_face = analyzer.analyze(unit.pose_image, "largest")
        kps_src, kps = unit.pose_image, pose_face.kps
    else:
        kps_src, kps = images[0], faces[0].kps
    hint = KpsHint(kps, (kps_src.shape[1], kps_src.shape[0]))
    tokens = face_tokens(adapter, embedding)
    out.attention.append((attention_unit(where, adapter, tokens),
                          Schedule(unit.weight, unit.start, unit.end, unit.hires_adapter)))
    out.control.append((control_unit(where, net, tokens, hint),
                        Schedule(unit.identitynet_strength, unit.identitynet_start, unit.identitynet_end,
                                 unit.hires_identitynet)))
    out.kps_hints.append(hint)
    out.infotext[where] = format_unit(unit, entry.name, cn_entry.name, len(images))


def prepare(request: Request, locations: Locations, unet: torch.nn.Module, *, device, dtype,
            face_device: str = "cpu", cache: ModelCache = CACHE) -> Prepared:
    """Everything one generation needs; raises an ``InstantIDError`` with a message for the user."""
    out = Prepared()
    units = request.active_units
    if not units:
        return out
    base = unet_family(unet).name
    entries = list_models(locations, cache)
    for i, unit in enumerate(units):
        where = unit_key(i, len(units))
        _instantid(unit, where, entries, locations, base, device, dtype, face_device, cache, out)
    return out


def preview(image: np.ndarray, locations: Locations, face_device: str = "cpu", mode="largest",
            cache: ModelCache = CACHE):
    """Faces of an image and the one ``mode`` chooses (None when there is no face)."""
    analyzer = face_analyzer(locations, face_device, cache)
    faces = analyzer.detect(image)
    chosen = analyzer.analyze(image, mode) if faces else None
    return faces, chosen


def kps_map(image: np.ndarray, face, width: Optional[int] = None, height: Optional[int] = None) -> np.ndarray:
    """The keypoint map of ``face`` (found in ``image``) at width x height (default: the image's size)."""
    h, w = image.shape[:2]
    return KpsHint(face.kps, (w, h)).image(width or w, height or h)


def preview_picture(image: np.ndarray, faces, chosen, pose_image: Optional[np.ndarray] = None,
                    pose_face=None) -> np.ndarray:
    """The photo with every face boxed (the chosen one green) beside the keypoint map that will be used."""
    import cv2
    shown = image.copy()
    thick = max(2, image.shape[1] // 256)
    for face in faces:
        color = (0, 255, 0) if np.array_equal(face.bbox, chosen.bbox) else (255, 200, 0)
        x0, y0, x1, y1 = (int(v) for v in face.bbox)
        cv2.rectangle(shown, (x0, y0), (x1, y1), color, thick)
    kps_image = kps_map(pose_image, pose_face) if pose_face is not None else kps_map(image, chosen)
    if kps_image.shape[0] != shown.shape[0]:
        scale = shown.shape[0] / kps_image.shape[0]
        kps_image = cv2.resize(kps_image, (max(1, int(kps_image.shape[1] * scale)), shown.shape[0]),
                               interpolation=cv2.INTER_NEAREST)
    return np.concatenate([shown, kps_image], axis=1)


def default_locations(models_path: str, extra_controlnet_dirs: Sequence[str] = (),
                      annotator_dir: Optional[str] = None) -> Locations:
    """The folders users already keep these files in (ours first, then sd-webui-controlnet's)."""
    ours = os.path.join(models_path, "instantid")
    ipadapter = os.path.join(models_path, "ipadapter")
    controlnet = os.path.join(models_path, "ControlNet")
    extra = [d for d in extra_controlnet_dirs if d]
    roots = [os.path.join(models_path, "insightface")]
    if annotator_dir:
        roots.append(os.path.join(annotator_dir, "insightface"))
    return Locations(adapter_dirs=[ours, ipadapter, controlnet, *extra],
                     controlnet_dirs=[ours, controlnet, *extra],
                     insightface_roots=roots)
