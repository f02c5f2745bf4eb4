"""Finding model files where users keep them and recognising each one by its keys and shapes.

File names only decide what the weights cannot tell (light vs standard, plus vs plus-face,
FaceID-Plus v1 vs v2, InstantID vs portrait "unnorm"); the user can override those guesses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional

from .weights import PICKLE_EXTS, SAFE_EXTS, TensorInfo, read_tensor_infos

CONTEXT_BASE = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
BASE_LABEL = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "any": "any model"}
CONTROLNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class Detected:
    role: str            # adapter | controlnet | faceid_lora | clip_vision | pulid | unknown
    variant: str = ""
    base: str = "any"    # sd15 | sdxl | sd2 | any
    tokens: int = 0
    needs: str = ""      # adapters: clip_embeds | clip_hidden | face | face+clip_hidden
    input_dim: int = 0   # adapters: width of the CLIP embeds / hidden states (face: 512) they take
    detail: str = ""
    hidden: int = 0      # image encoders: hidden width (their projection width is input_dim)

    @property
    def label(self) -> str:
        parts = [self.variant or self.role, BASE_LABEL.get(self.base, self.base)]
        return " · ".join(p for p in parts if p)


@dataclass(frozen=True)
class ModelEntry:
    name: str            # shown in the UI: path relative to its folder
    path: str            # a file, or a diffusers ControlNet folder
    detected: Detected


def _strip(infos: Dict[str, TensorInfo]):
    proj, ip, other = {}, {}, {}
    for key, info in infos.items():
        if key.startswith("image_proj."):
            proj[key[len("image_proj."):]] = info
        elif key.startswith("ip_adapter."):
            ip[key[len("ip_adapter."):]] = info
        else:
            other[key] = info
    return proj, ip, other


def _adapter(proj: Dict[str, TensorInfo], ip: Dict[str, TensorInfo], name: str) -> Detected:
    lower = name.lower()
    k1 = ip.get("1.to_k_ip.weight")
    if k1 is None or len(k1.shape) != 2:
        return Detected("unknown", detail="an image_proj/ip_adapter file without 1.to_k_ip.weight")
    ctx = k1.shape[1]
    base = CONTEXT_BASE.get(ctx, "unknown")
    lora = "0.to_q_lora.down.weight" in ip
    if "body.0.weight" in proj and "mapping_0.0.weight" in proj:
        return Detected("pulid", "pulid (sd-webui-controlnet repack)", base, 32,
                        detail="PuLID is not supported yet")
    if "proj.3.weight" in proj:
        return Detected("adapter", "full_face", base, 257, "clip_hidden", proj["proj.0.weight"].shape[1])
    if "perceiver_resampler.proj_in.weight" in proj:
        variant = "faceid_plusv2" if "v2" in lower else "faceid_plus"
        return Detected("adapter", variant, base, proj["proj.2.weight"].shape[0] // ctx,
                        "face+clip_hidden", proj["perceiver_resampler.proj_in.weight"].shape[1])
    if "proj.2.weight" in proj and "norm.weight" in proj:
        tokens = proj["proj.2.weight"].shape[0] // ctx
        if lora:
            return Detected("adapter", "faceid", base, tokens, "face", 512)
        return Detected("adapter", "faceid_portrait", base, tokens, "face", 512)
    if "latents" in proj and "proj_in.weight" in proj:
        tokens = proj["latents"].shape[1]
        width = proj["proj_in.weight"].shape[1]
        if width == 512:
            variant = "faceid_portrait_unnorm" if "unnorm" in lower else "instantid"
            return Detected("adapter", variant, base, tokens, "face", 512)
        variant = "plus_face" if "face" in lower else "plus"
        return Detected("adapter", variant, base, tokens, "clip_hidden", width)
    if "proj.weight" in proj:
        tokens = proj["proj.weight"].shape[0] // ctx
        width = proj["proj.weight"].shape[1]
        variant = "light" if "light" in lower else "base"
        return Detected("adapter", variant, base, tokens, "clip_embeds", width)
    return Detected("unknown", detail="an IP-Adapter-like file with an unknown image_proj")


def classify(infos: Optional[Dict[str, TensorInfo]], name: str) -> Detected:
    """Role and variant of a model file from its flat key -> shape/dtype map."""
    if infos is None:
        return Detected("unknown", detail="old pickle format: recognised when loaded")
    if not infos:
        return Detected("unknown", detail="no tensors")
    proj, ip, other = _strip(infos)
    if ip or proj:
        return _adapter(proj, ip, name)
    keys = infos.keys()
    if any(k.startswith("id_adapter.") for k in keys):
        variant = "pulid_v1.1" if "id_adapter.latents" in infos else "pulid_v1"
        return Detected("pulid", variant, "sdxl", detail="PuLID is not supported yet")
    if "controlnet_cond_embedding.conv_in.weight" in infos:
        attn = next((v for k, v in infos.items() if k.endswith("attn2.to_k.weight")), None)
        base = CONTEXT_BASE.get(attn.shape[1], "unknown") if attn else "unknown"
        return Detected("controlnet", "diffusers", base)
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in keys):
        return Detected("controlnet", "ldm", "any", detail="an ldm-format ControlNet")
    if any(k.startswith("lora_unet_") for k in keys) or any("_lora." in k for k in keys):
        k_down = next((v for k, v in infos.items()
                       if k.endswith(("attn2_to_k.lora_down.weight", "attn2_k_proj.lora_down.weight"))), None)
        base = CONTEXT_BASE.get(k_down.shape[1], "unknown") if k_down else "unknown"
        return Detected("faceid_lora", "lora", base)
    if "vision_model.post_layernorm.weight" in infos:
        from .clip_vision import describe_encoder
        desc = describe_encoder(infos)
        if desc is not None:
            return Detected("clip_vision", desc.name, "any", input_dim=desc.projection, hidden=desc.hidden,
                            detail=f"{desc.layers} layers")
    return Detected("unknown", detail="not an adapter, ControlNet, LoRA or image encoder file")


def _candidates(folder: str) -> Iterable[str]:
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        if any(f in files for f in CONTROLNET_WEIGHTS) and "config.json" in files:
            yield root
            continue
        for f in sorted(files):
            if f.lower().endswith(SAFE_EXTS + PICKLE_EXTS):
                yield os.path.join(root, f)


def weights_path(path: str) -> str:
    """The weights file of an entry (a diffusers ControlNet folder holds it inside)."""
    if os.path.isdir(path):
        for f in CONTROLNET_WEIGHTS:
            if os.path.isfile(os.path.join(path, f)):
                return os.path.join(path, f)
    return path


def inspect(path: str, cache: Optional[dict] = None) -> Detected:
    """Detect one file (or ControlNet folder); ``cache`` maps (path, size, mtime) -> Detected."""
    target = weights_path(path)
    try:
        stat = os.stat(target)
    except OSError:
        return Detected("unknown", detail="missing")
    key = (target, stat.st_size, stat.st_mtime)
    if cache is not None and key in cache:
        return cache[key]
    try:
        detected = classify(read_tensor_infos(target), os.path.basename(path))
    except Exception as exc:  # a damaged or refused file is listed as such, never raised here
        detected = Detected("unknown", detail=str(exc)[:200])
    if cache is not None:
        cache[key] = detected
    return detected


def scan(folders: Iterable[str], cache: Optional[dict] = None) -> List[ModelEntry]:
    """Every recognisable file under ``folders`` (missing folders are skipped)."""
    entries, seen = [], set()
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for path in _candidates(folder):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            detected = inspect(path, cache)
            if detected.role != "unknown":
                name = os.path.relpath(path, folder).replace(os.sep, "/")
                entries.append(ModelEntry(name, path, detected))
    return entries


def with_variant(detected: Detected, variant: str) -> Detected:
    """The user's override of a guess the weights cannot settle."""
    return replace(detected, variant=variant) if variant else detected
