"""Infotext: one entry per unit, ``InstantID: "adapter=...; weight=0.8; ..."``, and back.

The webui JSON-quotes values that contain commas or colons; ours use ``;`` and ``=`` so that the
value stays readable and survives the webui's own parsing (which unquotes it before we see it).
"""

from __future__ import annotations

from typing import Any, Dict, List

from .params import FIELDS_BY_NAME, UnitParams

KEY = "InstantID"
SAVED = ["adapter", "identitynet", "weight", "start", "end", "identitynet_strength", "identitynet_start",
         "identitynet_end", "face", "hires_adapter", "hires_identitynet", "encoder", "variant", "weight_type",
         "composition_weight", "combine", "lora_strength", "s_scale"]
# written only when they matter for the unit's adapter
ONLY_IF = {"identitynet": lambda v: v["variant"] == "instantid",
           "identitynet_strength": lambda v: v["variant"] == "instantid",
           "identitynet_start": lambda v: v["variant"] == "instantid",
           "identitynet_end": lambda v: v["variant"] == "instantid",
           "hires_identitynet": lambda v: v["variant"] == "instantid",
           "encoder": lambda v: bool(v["encoder"]),
           "composition_weight": lambda v: "composition" in v["weight_type"],
           "lora_strength": lambda v: v["variant"] in ("faceid", "faceid_plus", "faceid_plusv2"),
           "s_scale": lambda v: v["variant"] == "faceid_plusv2"}


def unit_key(index: int, count: int) -> str:
    return KEY if count == 1 else f"{KEY} unit {index + 1}"


def format_unit(unit: UnitParams, adapter: str, identitynet: str, images: int, encoder: str = "",
                variant: str = "instantid") -> str:
    values = dict((name, getattr(unit, name)) for name in SAVED)
    values.update(adapter=adapter, identitynet=identitynet, encoder=encoder, variant=variant)
    parts = [f"{name}={values[name]}" for name in SAVED if ONLY_IF.get(name, lambda v: True)(values)]
    return "; ".join(parts + [f"images={images}"])


def parse_unit(text: str) -> Dict[str, Any]:
    """``"k=v; k=v"`` -> {field: typed value}; unknown or malformed parts are ignored."""
    out: Dict[str, Any] = {}
    for part in str(text).split(";"):
        name, sep, value = part.strip().partition("=")
        field = FIELDS_BY_NAME.get(name.strip())
        if not sep or field is None:
            continue
        value = value.strip()
        try:
            if field.kind == "float":
                out[field.name] = float(value)
            elif field.kind == "bool":
                out[field.name] = value.lower() == "true"
            else:
                out[field.name] = value
        except ValueError:
            continue
    return out


def units_in(params: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The units found in a parsed infotext dict, in order."""
    found = []
    if KEY in params:
        found.append(parse_unit(params[KEY]))
    i = 1
    while f"{KEY} unit {i}" in params:
        found.append(parse_unit(params[f"{KEY} unit {i}"]))
        i += 1
    return found
