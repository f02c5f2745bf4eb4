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
from .errors import FaceAnalysisError, InputError, InstantIDError, ModelFileError
from .face_analysis import FaceAnalyzer, check_pack
from .identitynet import IdentityNet, infer_config
from .infotext import format_unit, unit_key
from .instantid import KpsHint
from .ip_attention import AttentionUnit
from .lora import LoraPatch
from .references import ClipEncoding, build_references, pick_encoder
from .residuals import ControlUnit
from .model_cache import CACHE, ModelCache
from .model_files import BASE_LABEL, ModelEntry, scan, weights_path
from .params import Request, UnitParams
from .session import GenerationPatch, Schedule
from .tokens import unit_tokens
from .unet_layers import cross_attention_layers, unet_family
from .weight_types import layer_weights
from .weights import load_file


@dataclass
class Locations:
    """Where model files are looked for, in order of preference."""

    adapter_dirs: List[str]
    controlnet_dirs: List[str]
    insightface_roots: List[str]
    clip_vision_dirs: List[str] = field(default_factory=list)


@dataclass
class Prepared:
    attention: list = field(default_factory=list)     # [(AttentionUnit, Schedule)]
    control: list = field(default_factory=list)       # [(ControlUnit, Schedule)]
    loras: list = field(default_factory=list)         # [LoraPatch]
    infotext: Dict[str, str] = field(default_factory=dict)

    def patch(self, unet: torch.nn.Module) -> GenerationPatch:
        return GenerationPatch(unet, self.attention, self.control, self.loras)


# -- listing -------------------------------------------------------------------------------------

def list_models(locations: Locations, cache: ModelCache = CACHE) -> Dict[str, List[ModelEntry]]:
    adapters = [e for e in scan(locations.adapter_dirs, cache.detected) if e.detected.role == "adapter"]
    controlnets = [e for e in scan(locations.controlnet_dirs, cache.detected)
                   if e.detected.role == "controlnet" and e.detected.variant == "diffusers"]
    encoders = [e for e in scan(locations.clip_vision_dirs, cache.detected) if e.detected.role == "clip_vision"]
    return {"adapters": adapters, "identitynets": controlnets, "encoders": encoders}


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


def face_analyzer(locations: Locations, device: str, cache: ModelCache = CACHE,
                  pack: str = "antelopev2") -> FaceAnalyzer:
    roots = [r for r in locations.insightface_roots if r]
    for root in roots:
        if os.path.isdir(os.path.join(root, "models", pack)):
            check_pack(root, pack)
            return cache.get("face_analyzer", os.path.join(root, "models", pack),
                             lambda: FaceAnalyzer(root, device, pack=pack), device)
    check_pack(roots[0], pack)   # raises the message for the main location
    raise FaceAnalysisError(f"{pack} was not found.")  # pragma: no cover


# -- one unit ------------------------------------------------------------------------------------

ADAPTER_HINT = ("Put the adapter file into models/instantid/ or models/ipadapter/ (or models/ControlNet/, where "
                "sd-webui-controlnet keeps them).")
IDENTITYNET_HINT = ("Put InstantX's ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) into "
                    "models/instantid/, or control_instant_id_sdxl.safetensors into models/ControlNet/.")


def _adapter_entry(unit: UnitParams, where: str, entries, base: str) -> ModelEntry:
    adapters = entries["adapters"]
    if unit.adapter:
        entry = _pick(adapters, unit.adapter, "Adapter", ADAPTER_HINT)
    else:
        fitting = [e for e in adapters if e.detected.base == base]
        entry = _pick(fitting or adapters, "", f"adapter for {BASE_LABEL.get(base, base)}", ADAPTER_HINT,
                      prefer=("instant",))
    if entry.detected.base != base:
        adapter_base = BASE_LABEL.get(entry.detected.base, entry.detected.base)
        if entry.detected.variant == "instantid":
            raise InstantIDError(f"InstantID works only with SDXL checkpoints, but the loaded checkpoint is "
                                 f"{BASE_LABEL.get(base, base)}. Load an SDXL checkpoint.")
        raise InstantIDError(f"{where}: '{entry.name}' is an adapter for {adapter_base}, but the loaded checkpoint "
                             f"is {BASE_LABEL.get(base, base)}. Load an {adapter_base} checkpoint or choose an "
                             f"adapter made for {BASE_LABEL.get(base, base)}.")
    return entry


def _mask(image: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    if image is None:
        return None
    return torch.from_numpy(image.astype(np.float32).mean(axis=2) / 255.0)


def _unit(unit: UnitParams, where: str, entries, locations: Locations, layers, base: str, device, dtype,
          face_device: str, cache: ModelCache, out: Prepared) -> None:
    entry = _adapter_entry(unit, where, entries, base)
    adapter: LoadedAdapter = cache.get("adapter", entry.path,
                                       lambda: load_adapter(entry.path, entry.name, unit.variant), unit.variant)
    images = unit.all_images
    if not images:
        raise InputError(f"{where}: no reference image was given; drop a photo into the panel "
                         "(API: field 'image').")
    variant = adapter.detected.variant
    pack = "antelopev2" if variant == "instantid" else "buffalo_l"
    encoder_entry = []

    def clip():
        if not encoder_entry:
            encoder_entry.append(pick_encoder(entries["encoders"], adapter, unit.encoder, locations.clip_vision_dirs))
        return ClipEncoding(encoder_entry[0], device, dtype, cache)

    analyzer = lambda: face_analyzer(locations, face_device, cache, pack)  # noqa: E731
    refs = build_references(adapter, images, unit.negative_image, unit.face, where, clip, analyzer)
    tokens = unit_tokens(adapter, refs, unit.combine, unit.s_scale)
    scales = layer_weights(layers, unit.weight_type, unit.weight, unit.composition_weight)
    attention = AttentionUnit(where, tokens, adapter.ip, layer_scales=scales, mask=_mask(unit.mask))
    out.attention.append((attention, Schedule(1.0, unit.start, unit.end, unit.hires_adapter)))
    if adapter.lora and unit.lora_strength:
        out.loras.append(LoraPatch(layers, adapter.lora, unit.lora_strength, name=entry.name))
    extra = {"encoder": encoder_entry[0].name if encoder_entry else "", "variant": variant}
    identitynet = ""
    if variant == "instantid":
        cn_entry = _pick([e for e in entries["identitynets"] if e.detected.base == "sdxl"], unit.identitynet,
                         "IdentityNet (InstantID ControlNet)", IDENTITYNET_HINT, prefer=("instant", "identity"))
        net = cache.get("identitynet", cn_entry.path, lambda: load_identitynet(cn_entry.path, device, dtype),
                        device, dtype)
        face_an = analyzer()
        if unit.pose_image is not None:
            kps_src, kps = unit.pose_image, face_an.analyze(unit.pose_image, "largest").kps
        else:
            kps_src, kps = images[0], face_an.analyze(images[0], unit.face).kps
        hint = KpsHint(kps, (kps_src.shape[1], kps_src.shape[0]))
        out.control.append((ControlUnit(where, net, tokens, hint),
                            Schedule(unit.identitynet_strength, unit.identitynet_start, unit.identitynet_end,
                                     unit.hires_identitynet)))
        identitynet = cn_entry.name
    out.infotext[where] = format_unit(unit, entry.name, identitynet, len(images), **extra)


def prepare(request: Request, locations: Locations, unet: torch.nn.Module, *, device, dtype,
            face_device: str = "cpu", cache: ModelCache = CACHE) -> Prepared:
    """Everything one generation needs; raises an ``InstantIDError`` with a message for the user."""
    out = Prepared()
    units = request.active_units
    if not units:
        return out
    base = unet_family(unet).name
    layers = cross_attention_layers(unet)
    entries = list_models(locations, cache)
    for i, unit in enumerate(units):
        _unit(unit, unit_key(i, len(units)), entries, locations, layers, base, device, dtype, face_device,
              cache, out)
    return out


NEEDS_TEXT = {"clip_embeds": "CLIP image embeds", "clip_hidden": "CLIP hidden states",
              "face": "a face embedding", "face+clip_hidden": "a face embedding and CLIP hidden states of the face"}


class _Needs:
    """What pick_encoder reads of an adapter, from a listing entry (no loading)."""

    def __init__(self, entry: ModelEntry) -> None:
        self.name, self.detected = entry.name, entry.detected


def describe_entry(entry: ModelEntry, encoders: Sequence[ModelEntry]) -> str:
    """One line for the UI: what a model file was detected as and what it needs."""
    d = entry.detected
    parts = [f"**{entry.name}**: {d.variant}", BASE_LABEL.get(d.base, d.base), f"{d.tokens} tokens",
             NEEDS_TEXT.get(d.needs, d.needs)]
    if d.variant == "instantid":
        parts.append("antelopev2 faces + IdentityNet")
    elif d.needs.startswith("face"):
        parts.append("buffalo_l faces" + (" + the LoRA inside the file" if d.variant in
                                          ("faceid", "faceid_plus", "faceid_plusv2") else ""))
    if "clip" in d.needs:
        try:
            parts.append("encoder: " + pick_encoder(encoders, _Needs(entry), "", []).name)
        except ModelFileError:
            parts.append("encoder: none found (see the message when generating)")
    return " · ".join(parts)


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
    clip_dirs = [os.path.join(models_path, "clip_vision")]
    if annotator_dir:
        roots.append(os.path.join(annotator_dir, "insightface"))
        clip_dirs.append(os.path.join(annotator_dir, "clip_vision"))
    return Locations(adapter_dirs=[ours, ipadapter, controlnet, *extra],
                     controlnet_dirs=[ours, controlnet, *extra],
                     insightface_roots=roots, clip_vision_dirs=clip_dirs)
