"""The request: named, documented fields, read from the UI's positional values or an API dict.

API (``alwayson_scripts: {"InstantID": {"args": [ ... ]}}``) accepts:
- ``[{"enabled": true, "image": "<base64>", ...}]``: one unit as a dict of the fields below;
- ``[{"enabled": true, "units": [{...}, {...}]}]``: several units;
- the UI's positional list (see ``UI_ORDER``).
Images are base64 strings (a ``data:image/...;base64,`` prefix is allowed). A wrong value raises
``InputError`` naming the field.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import InputError


@dataclass
class Field:
    name: str
    kind: str            # bool | float | str | choice | image | images | face
    default: Any
    doc: str
    lo: Optional[float] = None
    hi: Optional[float] = None


UNIT_FIELDS: List[Field] = [
    Field("enabled", "bool", True, "Use this unit."),
    Field("image", "image", None, "Reference photo of the face (base64)."),
    Field("images", "images", [], "More photos of the same person (list of base64); their embeddings are averaged."),
    Field("pose_image", "image", None, "Optional image whose face keypoints set the pose (InstantID)."),
    Field("adapter", "str", "", "Adapter file name as listed by GET /instantid/v1/models (e.g. ip-adapter.bin); "
                                 "empty = the first one found."),
    Field("identitynet", "str", "", "IdentityNet (InstantID ControlNet) file or folder name; empty = the first "
                                     "one found."),
    Field("weight", "float", 0.8, "Adapter (IP) weight.", -1.0, 3.0),
    Field("start", "float", 0.0, "Fraction of the steps where the adapter starts.", 0.0, 1.0),
    Field("end", "float", 1.0, "Fraction of the steps where the adapter stops.", 0.0, 1.0),
    Field("identitynet_strength", "float", 0.8, "IdentityNet (ControlNet) strength.", 0.0, 2.0),
    Field("identitynet_start", "float", 0.0, "Fraction of the steps where IdentityNet starts.", 0.0, 1.0),
    Field("identitynet_end", "float", 1.0, "Fraction of the steps where IdentityNet stops.", 0.0, 1.0),
    Field("face", "face", "largest", "Which face of the photo: \"largest\" or its index counted left to right (0 = "
                                     "leftmost)."),
    Field("hires_adapter", "bool", True, "Use the adapter in the hires-fix second pass too."),
    Field("hires_identitynet", "bool", True, "Use IdentityNet in the hires-fix second pass too."),
    Field("encoder", "str", "", "CLIP image encoder file for IP-Adapter models; empty = the one that fits the "
                                 "adapter."),
    Field("variant", "choice", "", "Override what the file name suggests where the weights cannot tell: "
                                   "light, plus_face, faceid_plusv2, faceid_portrait_unnorm..."),
    Field("weight_type", "choice", "linear", "How the weight is spread over the UNet's layers (linear, ease in, "
                                             "style transfer, composition...)."),
    Field("composition_weight", "float", 1.0, "Weight of the composition layers for the 'style and "
                                              "composition' weight types.", -1.0, 3.0),
    Field("combine", "choice", "auto", "Several reference images: average their embeddings, or concat their "
                                       "tokens (auto: concat for FaceID portrait, else average)."),
    Field("negative_image", "image", None, "Optional image whose encoding replaces the empty uncond input "
                                           "(CLIP-based adapters)."),
    Field("mask", "image", None, "Optional attention mask: white = where the unit acts."),
    Field("lora_strength", "float", 1.0, "Strength of the LoRA inside FaceID files (applied automatically).",
          0.0, 2.0),
    Field("s_scale", "float", 1.0, "FaceID-Plus v2 structure weight (s_scale).", 0.0, 3.0),
]
CHOICES = {
    "variant": ("", "base", "light", "plus", "plus_face", "full_face", "faceid", "faceid_plus", "faceid_plusv2",
                "faceid_portrait", "faceid_portrait_unnorm", "instantid"),
    "weight_type": ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input",
                    "weak middle", "weak output", "strong middle", "style transfer", "composition",
                    "strong style transfer", "style and composition", "strong style and composition"),
    "combine": ("auto", "average", "concat"),
}
FIELDS_BY_NAME = {f.name: f for f in UNIT_FIELDS}
UI_ORDER = [f.name for f in UNIT_FIELDS]     # the UI returns: panel enabled, then these per unit


@dataclass
class UnitParams:
    enabled: bool = True
    image: Optional[np.ndarray] = None
    images: List[np.ndarray] = field(default_factory=list)
    pose_image: Optional[np.ndarray] = None
    adapter: str = ""
    identitynet: str = ""
    weight: float = 0.8
    start: float = 0.0
    end: float = 1.0
    identitynet_strength: float = 0.8
    identitynet_start: float = 0.0
    identitynet_end: float = 1.0
    face: str = "largest"
    hires_adapter: bool = True
    hires_identitynet: bool = True
    encoder: str = ""
    variant: str = ""
    weight_type: str = "linear"
    composition_weight: float = 1.0
    combine: str = "auto"
    negative_image: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    lora_strength: float = 1.0
    s_scale: float = 1.0

    @property
    def all_images(self) -> List[np.ndarray]:
        return ([self.image] if self.image is not None else []) + list(self.images)


@dataclass
class Request:
    enabled: bool = False
    units: List[UnitParams] = field(default_factory=list)

    @property
    def active_units(self) -> List[UnitParams]:
        return [u for u in self.units if u.enabled] if self.enabled else []


# -- value conversion ----------------------------------------------------------------------------

def decode_image(value: Any, name: str) -> Optional[np.ndarray]:
    """A UI or API image -> RGB uint8 HxWx3, or None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dict):                      # gradio sketch/upload dicts
        value = value.get("image", value.get("name"))
        if value is None:
            return None
    try:
        from PIL import Image
        if isinstance(value, np.ndarray):
            arr = value
        elif isinstance(value, Image.Image):
            arr = np.asarray(value.convert("RGB"))
        elif isinstance(value, str):
            data = value.split(",", 1)[1] if value.startswith("data:") else value
            with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as img:
                arr = np.asarray(img.convert("RGB"))
        elif hasattr(value, "name") and isinstance(value.name, str):   # gradio file objects
            with Image.open(value.name) as img:
                arr = np.asarray(img.convert("RGB"))
        else:
            raise TypeError(type(value).__name__)
    except Exception:
        raise InputError(f"Field '{name}' is not a readable image; send a PNG or JPEG file as a base64 "
                         "string.") from None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"Field '{name}' must be an RGB image, got an array of shape {tuple(arr.shape)}.")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def convert(f: Field, value: Any, where: str) -> Any:
    name = f"{where}{f.name}"
    if f.kind == "image":
        return decode_image(value, name)
    if f.kind == "images":
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            value = [value]
        images = [decode_image(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return [im for im in images if im is not None]
    if f.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InputError(f"Field '{name}' must be true or false, got {value!r}.")
    if f.kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"Field '{name}' must be a number, got {value!r}.") from None
        if (f.lo is not None and number < f.lo) or (f.hi is not None and number > f.hi):
            raise InputError(f"Field '{name}' must be between {f.lo} and {f.hi}, got {number}.")
        return number
    if f.kind == "face":
        text = str(value).strip().lower() if value is not None else "largest"
        if text in ("", "largest"):
            return "largest"
        try:
            index = int(float(text))
        except ValueError:
            raise InputError(f"Field '{name}' must be \"largest\" or a face index (0 = leftmost), "
                             f"got {value!r}.") from None
        if index < 0:
            raise InputError(f"Field '{name}' must be 0 or more, got {index}.")
        return str(index)
    if value is None:
        return "" if f.kind == "str" else f.default
    if not isinstance(value, str):
        raise InputError(f"Field '{name}' must be a string, got {value!r}.")
    text = value.strip()
    if f.default == "" and text.lower() == "auto":      # the UI shows an empty choice as "auto"
        return ""
    if f.kind == "choice":
        text = text.lower() if f.name != "variant" else text.lower().replace("-", "_")
        if text == "" and f.name != "variant":
            return f.default
        if text not in CHOICES[f.name]:
            options = ", ".join(repr(c) for c in CHOICES[f.name] if c)
            raise InputError(f"Field '{name}' must be one of {options}, got {value!r}.")
    return text


def _check_windows(unit: UnitParams, where: str) -> None:
    for a, b in (("start", "end"), ("identitynet_start", "identitynet_end")):
        if getattr(unit, a) > getattr(unit, b):
            raise InputError(f"Field '{where}{a}' ({getattr(unit, a)}) must not be after '{where}{b}' "
                             f"({getattr(unit, b)}).")


def unit_from_dict(data: Dict[str, Any], where: str = "") -> UnitParams:
    unknown = sorted(set(data) - set(FIELDS_BY_NAME))
    if unknown:
        raise InputError(f"Unknown field '{where}{unknown[0]}'. Known fields: {', '.join(UI_ORDER)}.")
    values = {f.name: convert(f, data[f.name], where) for f in UNIT_FIELDS if f.name in data}
    unit = UnitParams(**values)
    _check_windows(unit, where)
    return unit


def unit_from_values(values: Sequence[Any], where: str = "") -> UnitParams:
    data = {name: value for name, value in zip(UI_ORDER, values)}
    return unit_from_dict(data, where)


def parse_args(args: Sequence[Any]) -> Request:
    """Script args (UI positional list, or an API list whose first item is a dict) -> Request."""
    args = list(args)
    if args and isinstance(args[0], dict):
        data = dict(args[0])
        enabled = convert(Field("enabled", "bool", False, ""), data.pop("enabled", False), "")
        if not enabled:           # a disabled panel is never an error
            return Request(False, [])
        if "units" in data:
            units_data = data.pop("units")
            if data:
                raise InputError(f"Unknown field '{sorted(data)[0]}' next to 'units'; put unit fields inside "
                                 "each unit.")
            if not isinstance(units_data, list):
                raise InputError("Field 'units' must be a list of unit objects.")
            units = []
            for i, u in enumerate(units_data):
                if not isinstance(u, dict):
                    raise InputError(f"Field 'units[{i}]' must be an object of unit fields.")
                units.append(unit_from_dict(u, f"units[{i}]."))
        else:
            units = [unit_from_dict(data)]
        return Request(bool(enabled), units)
    if not args:
        return Request(False, [])
    enabled = convert(Field("enabled", "bool", False, ""), args[0], "")
    if not enabled:
        return Request(False, [])
    n = len(UI_ORDER)
    count = (len(args) - 1) // n                     # the panel's units, each in UI_ORDER
    units = [unit_from_values(args[1 + i * n: 1 + (i + 1) * n], f"units[{i}].") for i in range(count)]
    if any(u.enabled and u.all_images for u in units):
        # in the panel, unit 1 is ticked by default: a ticked unit left without a photo is not in use
        # when another unit has one (with no photo anywhere, the generation says what is missing)
        for u in units:
            if not u.all_images:
                u.enabled = False
    return Request(bool(enabled), units)


def describe_fields() -> List[Dict[str, Any]]:
    """The API field list (for documentation and GET /instantid/v1/models)."""
    out = []
    for f in UNIT_FIELDS:
        item = {"name": f.name, "type": f.kind, "default": f.default, "doc": f.doc}
        if f.lo is not None:
            item["min"], item["max"] = f.lo, f.hi
        if f.name in CHOICES:
            item["choices"] = [c for c in CHOICES[f.name] if c]
        out.append(item)
    return out
