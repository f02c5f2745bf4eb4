"""Rules for converting IP-Adapter training checkpoints: key mapping, templates, validation.

The official training scripts wrap the UNet and the adapter in one module whose attributes are
registered in the order ``unet``, ``image_proj_model``, ``adapter_modules``, where
``adapter_modules = ModuleList(unet.attn_processors.values())``. Its state dict therefore holds:

- ``image_proj_model.<X>``           -> ``image_proj.<X>``
- ``adapter_modules.<N>.<P>``        -> ``ip_adapter.<N>.<P>`` (N = diffusers processor order:
  down blocks, up blocks, mid block; attn1 = even, attn2 = odd)
- ``unet.<path>.processor.<P>``      the same tensors as ``adapter_modules`` (they share storage).
  accelerate's safetensors writer keeps only the first name of shared tensors, so a
  ``model.safetensors`` has no ``adapter_modules.*`` at all: N is rebuilt from ``<path>`` with the
  layer map (``manifests/unet_attn_layer_map.json``).
- every other ``unet.*`` key is the frozen UNet: ignored.

A ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix is removed. Files already in the
published layout (``image_proj.*`` / ``ip_adapter.*``, nested or flat) pass through unchanged.
Anything else is "unknown" and fails validation.

Templates are the key -> (shape, dtype) lists of published files: a built-in manifest or a real
file the user points at. Validation lists missing and unexpected keys, shape and dtype mismatches,
and structural problems (SD 1.5 and SDXL layers mixed, processor indices out of range).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .errors import InputError, ModelFileError
from .model_files import BASE_LABEL, CONTEXT_BASE
from .weights import TensorInfo, flatten, load_file, read_tensor_infos

MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests")
PROCESSOR_PARAMS = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora", "to_k_ip", "to_v_ip")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PROCESSOR_COUNT = {"sd15": 32, "sdxl": 140}
# classify() variant -> manifest families with the same tensors, the preferred one first
VARIANT_FAMILIES = {
    "base": ("standard", "standard-vitG", "light"), "light": ("light", "standard", "standard-vitG"),
    "plus": ("plus", "plus-face"), "plus_face": ("plus-face", "plus"), "full_face": ("full-face",),
    "faceid": ("faceid",), "faceid_plus": ("faceid-plus", "faceid-plusv2"),
    "faceid_plusv2": ("faceid-plusv2", "faceid-plus"), "faceid_portrait": ("faceid-portrait",),
    "faceid_portrait_unnorm": ("faceid-portrait-unnorm", "instantid"),
    "instantid": ("instantid", "faceid-portrait-unnorm"),
}
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_PROCESSOR_KEY = re.compile(r"^unet\.(.+)\.processor\.((?:%s)\..+)$" % "|".join(PROCESSOR_PARAMS))
_ADAPTER_KEY = re.compile(r"^(?:adapter_modules|ip_adapter)\.(\d+)\.(.+)$")
_IP_KEY = re.compile(r"^ip_adapter\.(\d+)\.(.+)$")
_TOKEN_WIDTH_KEYS = ("norm.weight", "norm_out.weight", "proj.3.weight")

Spec = Tuple[Tuple[int, ...], torch.dtype]


def base_label(base: str) -> str:
    return BASE_LABEL.get(base, base or "unknown base model")


# ----------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------


def strip_wrappers(key: str) -> Tuple[str, str]:
    """(key without DDP / torch.compile prefixes, the prefixes removed)."""
    removed = ""
    while key.startswith(WRAPPER_PREFIXES):
        prefix = key.split(".", 1)[0] + "."
        removed += prefix
        key = key[len(prefix):]
    return key, removed


def key_kind(key: str) -> str:
    """What a raw input key is: proj | adapter | processor | ignored | unknown (names only)."""
    key, _ = strip_wrappers(key)
    if key.startswith(("image_proj_model.", "image_proj.")):
        return "proj"
    if _ADAPTER_KEY.match(key):
        return "adapter"
    if _PROCESSOR_KEY.match(key):
        return "processor"
    if key.startswith("unet."):
        return "ignored"
    return "unknown"


@lru_cache(maxsize=1)
def layer_map() -> Dict[str, List[dict]]:
    """Per base (sd15, sdxl): the attention processors in diffusers order (see the JSON)."""
    with open(os.path.join(MANIFEST_DIR, "unet_attn_layer_map.json"), encoding="utf-8") as f:
        data = json.load(f)
    return {base: data[base] for base in data["unet_configs"]}


def _path_index(base: str) -> Dict[str, int]:
    return {row["diffusers"]: row["processor_index"] for row in layer_map()[base]}


def layer_path(base: str, index: int) -> str:
    rows = layer_map().get(base, [])
    return rows[index]["diffusers"] if 0 <= index < len(rows) else ""


@dataclass
class Mapped:
    tensors: Dict[str, torch.Tensor]              # published flat keys, input order
    layouts: List[str] = field(default_factory=list)
    prefixes: List[str] = field(default_factory=list)
    rebuilt: int = 0                               # ip_adapter keys rebuilt from unet.*.processor.*
    ignored: Dict[str, int] = field(default_factory=dict)
    unknown: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


def _ignored_group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else key


def _processor_base(paths: Iterable[str], ctx_dims: Iterable[int]) -> Tuple[str, List[str]]:
    """Which UNet the processor paths belong to (the better fit when mixed), and problems."""
    paths = set(paths)
    sd15, sdxl = set(_path_index("sd15")), set(_path_index("sdxl"))
    only15, onlyxl = sorted(paths & (sd15 - sdxl)), sorted(paths & (sdxl - sd15))
    if only15 and onlyxl:
        base = "sd15" if len(paths & sd15) >= len(paths & sdxl) else "sdxl"
        return base, [f"The unet.*.processor.* keys mix the SD 1.5 and SDXL UNets: '{only15[0]}' exists only in "
                      f"SD 1.5 ({len(only15)} such layers), '{onlyxl[0]}' only in SDXL ({len(onlyxl)} such "
                      "layers)."]
    if only15 or onlyxl:
        return ("sd15" if only15 else "sdxl"), []
    bases = {CONTEXT_BASE.get(d) for d in ctx_dims} & {"sd15", "sdxl"}
    if len(bases) == 1:
        return bases.pop(), []
    return "", ["The unet.*.processor.* keys do not tell SD 1.5 from SDXL (no layer unique to either, "
                "and no to_k_ip weight with a 768 or 2048 context)."]


def map_keys(state: Mapping[str, torch.Tensor]) -> Mapped:
    """Rename a training (or already converted) state dict to the published flat layout."""
    out = Mapped({})
    sources: Dict[str, str] = {}
    processors: List[Tuple[str, str, str, torch.Tensor]] = []   # (raw key, path, param, tensor)
    prefixes, layouts = Counter(), Counter()
    ignored = Counter()

    def put(new: str, raw: str, tensor: torch.Tensor) -> None:
        if new in out.tensors:
            out.problems.append(f"'{raw}' and '{sources[new]}' both map to '{new}'.")
            return
        out.tensors[new], sources[new] = tensor, raw

    for raw, tensor in state.items():
        key, removed = strip_wrappers(raw)
        if removed:
            prefixes[removed] += 1
        kind = key_kind(key)
        if kind == "proj":
            layouts["training" if key.startswith("image_proj_model.") else "published"] += 1
            put("image_proj." + key.split(".", 1)[1], raw, tensor)
        elif kind == "adapter":
            n, rest = _ADAPTER_KEY.match(key).groups()
            layouts["training" if key.startswith("adapter_modules.") else "published"] += 1
            put(f"ip_adapter.{int(n)}.{rest}", raw, tensor)
        elif kind == "processor":
            path, param = _PROCESSOR_KEY.match(key).groups()
            processors.append((raw, path, param, tensor))
        elif kind == "ignored":
            ignored[_ignored_group(key)] += 1
        else:
            out.unknown.append(raw)

    if processors:
        _rebuild(out, processors, ignored, put)
    out.ignored = dict(ignored.most_common())
    out.prefixes = sorted(prefixes)
    if layouts["training"] or processors:
        out.layouts.append("training checkpoint (image_proj_model / adapter_modules)")
    if layouts["published"]:
        out.layouts.append("published layout (image_proj / ip_adapter)")
    if out.rebuilt:
        out.layouts.append(f"{out.rebuilt} adapter tensors rebuilt from unet.*.processor.* (accelerate's "
                           "model.safetensors drops adapter_modules.*, which share storage with them)")
    return out


def _rebuild(out: Mapped, processors, ignored: Counter, put) -> None:
    """ip_adapter.N.* from unet.<path>.processor.*: N is the path's position in diffusers order."""
    ctx = [t.shape[1] for _, _, p, t in processors if p in ("to_k_ip.weight", "to_v_ip.weight") and t.dim() == 2]
    base, problems = _processor_base((p for _, p, _, _ in processors), ctx)
    out.problems.extend(problems)
    index = _path_index(base) if base else {}
    strangers: List[str] = []
    for raw, path, param, tensor in processors:
        n = index.get(path)
        if n is None:
            strangers.append(path)
            out.unknown.append(raw)
            continue
        new = f"ip_adapter.{n}.{param}"
        if new in out.tensors:     # the adapter_modules alias was saved too (pytorch_model.bin)
            if tuple(out.tensors[new].shape) != tuple(tensor.shape):
                out.problems.append(f"'{raw}' (processor {n}) has shape {list(tensor.shape)} but its "
                                    f"adapter_modules twin has {list(out.tensors[new].shape)}: the processor "
                                    "order of the training run is not diffusers' order.")
            ignored["unet.*.processor (aliases of adapter_modules)"] += 1
            continue
        put(new, raw, tensor)
        out.rebuilt += 1
    if strangers and base and not problems:
        out.problems.append(f"{len(strangers)} unet.*.processor.* keys name layers the {base_label(base)} UNet "
                            f"does not have, e.g. '{strangers[0]}' (listed under unknown keys).")


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    name: str
    source: str                    # "built-in manifest" | "manifest file" | "file"
    specs: Dict[str, Spec]         # flat key -> (shape, dtype), module order when `ordered`
    container: str = ""
    family: str = ""
    base: str = ""
    ordered: bool = True


def _manifest_template(name: str, m: dict, source: str = "built-in manifest") -> Template:
    specs: Dict[str, Spec] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and "shape" in v and "dtype" in v:
                specs[prefix + k] = (tuple(v["shape"]), _DTYPES.get(v["dtype"], torch.float32))
            elif isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(m["tensors"], "")
    return Template(name[:-5] if name.endswith(".json") else name, source, specs,
                    m.get("container", ""), m.get("family", ""), m.get("base_model", ""))


@lru_cache(maxsize=1)
def builtin_templates() -> Tuple[Template, ...]:
    """Every built-in IP-Adapter style manifest (PuLID, LoRA and encoder manifests excluded)."""
    found = []
    for name in sorted(os.listdir(MANIFEST_DIR)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(MANIFEST_DIR, name), encoding="utf-8") as f:
            m = json.load(f)
        if "tensors" not in m or "pulid" in m.get("family", ""):
            continue
        t = _manifest_template(name, m)
        if any(k.startswith("image_proj.") for k in t.specs) and any(k.startswith("ip_adapter.") for k in t.specs):
            found.append(t)
    return tuple(found)


def template_names() -> List[str]:
    return [t.name for t in builtin_templates()]


def template_by_name(name: str, fmt: str = "bin") -> Template:
    """A built-in manifest by name: 'ip-adapter-plus_sd15', with or without '.bin' / '.json'."""
    wanted = name[:-5] if name.endswith(".json") else name
    by_name = {t.name: t for t in builtin_templates()}
    exts = (".bin", ".safetensors") if fmt == "bin" else (".safetensors", ".bin")
    for candidate in (wanted,) + tuple(wanted + e for e in exts):
        if candidate in by_name:
            return by_name[candidate]
    close = difflib.get_close_matches(wanted, list(by_name), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run with --list-templates to see them."
    raise InputError(f"--template '{name}' is neither a file nor a built-in template.{hint}")


def template_from_file(path: str) -> Template:
    """The key/shape/dtype list of a real adapter file (the tensors are not read)."""
    infos = read_tensor_infos(path)
    if infos is None:   # an old-format pickle: loaded on the meta device, nothing is allocated
        infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in flatten(load_file(path, "meta")).items()}
    specs = {k: (tuple(v.shape), v.dtype) for k, v in infos.items()
             if k.startswith(("image_proj.", "ip_adapter."))}
    if not any(k.startswith("ip_adapter.") for k in specs) or not any(k.startswith("image_proj.") for k in specs):
        raise ModelFileError(f"The template '{os.path.basename(path)}' is not an IP-Adapter / FaceID / InstantID "
                             "file (it has no image_proj and ip_adapter weights).")
    k1 = specs.get("ip_adapter.1.to_k_ip.weight")
    base = CONTEXT_BASE.get(k1[0][1], "") if k1 and len(k1[0]) == 2 else ""
    ordered = not path.lower().endswith(".safetensors")   # safetensors stores keys sorted
    container = "torch-pickle-nested" if ordered else "safetensors-flat"
    return Template(os.path.basename(path), "file", specs, container, "", base, ordered)


def resolve_template(template: Optional[str], fmt: str) -> Optional[Template]:
    """--template: an existing file (adapter, or a manifest .json) or a built-in manifest name."""
    if not template:
        return None
    if os.path.isfile(template):
        if template.lower().endswith(".json"):
            with open(template, encoding="utf-8") as f:
                try:
                    m = json.load(f)
                except ValueError as exc:
                    raise InputError(f"--template '{template}' is not valid JSON ({exc}).") from None
            if "tensors" not in m:
                raise InputError(f"--template '{template}' is not a manifest (it has no 'tensors').")
            return _manifest_template(os.path.basename(template), m, source="manifest file")
        return template_from_file(template)
    return template_by_name(template, fmt)


def _score(infos: Mapping[str, TensorInfo], t: Template) -> int:
    hits = sum(1 for k, i in infos.items() if k in t.specs and tuple(i.shape) == t.specs[k][0])
    return 2 * hits - len(infos) - len(t.specs)


def context_bases(infos: Mapping[str, TensorInfo]) -> List[str]:
    """The base models the to_k_ip / to_v_ip context widths point at (several when mixed)."""
    dims = {i.shape[1] for k, i in infos.items()
            if _IP_KEY.match(k) and k.endswith(("to_k_ip.weight", "to_v_ip.weight")) and len(i.shape) == 2}
    return sorted(CONTEXT_BASE.get(d, f"context {d}") for d in dims)


def pick_template(infos: Mapping[str, TensorInfo], variant: str, base: str, fmt: str) -> Optional[Template]:
    """The built-in manifest for ``variant`` on ``base`` closest to the converted tensors.

    variant "" (not recognised): any family; base "" (unknown or mixed): any base. None when no
    published file has that architecture (e.g. full-face SDXL) or nothing matches at all.
    """
    if not infos:
        return None
    families = VARIANT_FAMILIES.get(variant, ())
    pool = [t for t in builtin_templates()
            if (not base or t.base == base) and (not families or t.family in families)]
    if not pool:
        return None
    container = "safetensors-flat" if fmt == "safetensors" else "torch-pickle-nested"
    rank = {f: -i for i, f in enumerate(families)}
    best = max(pool, key=lambda t: (_score(infos, t), rank.get(t.family, 0), t.container == container,
                                    -len(t.name), t.name))
    return best if _score(infos, best) > -len(infos) - len(best.specs) else None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatches: List[Tuple[str, List[int], List[int]]] = field(default_factory=list)
    dtype_mismatches: List[Tuple[str, str, str]] = field(default_factory=list)
    missing_layers: List[str] = field(default_factory=list)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compare(infos: Mapping[str, TensorInfo], t: Template) -> Comparison:
    c = Comparison()
    c.missing = [k for k in t.specs if k not in infos]
    c.unexpected = [k for k in infos if k not in t.specs]
    for key, info in infos.items():
        if key not in t.specs:
            continue
        shape, dtype = t.specs[key]
        if tuple(info.shape) != shape:
            c.shape_mismatches.append((key, list(info.shape), list(shape)))
        elif info.dtype != dtype:
            c.dtype_mismatches.append((key, dtype_name(info.dtype), dtype_name(dtype)))
    by_layer: Dict[int, List[str]] = {}
    for key in c.missing:
        m = _IP_KEY.match(key)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(m.group(2))
    for n, params in sorted(by_layer.items()):
        path = layer_path(t.base, n)
        where = f" ({path})" if path else ""
        c.missing_layers.append(f"{n}{where}: {', '.join(params)}")
    return c


def _indices(keys: Iterable[str]) -> str:
    nums = sorted(set(keys), key=int)
    return ", ".join(nums[:8]) + (f" and {len(nums) - 8} more" if len(nums) > 8 else "")


def structural_problems(infos: Mapping[str, TensorInfo]) -> List[str]:
    """SD 1.5 / SDXL mixes and processor indices no UNet has, whatever the template."""
    problems = []
    ctx_by_index: Dict[int, List[str]] = {}
    highest = -1
    for key, info in infos.items():
        m = _IP_KEY.match(key)
        if not m:
            continue
        n = int(m.group(1))
        highest = max(highest, n)
        if m.group(2) in ("to_k_ip.weight", "to_v_ip.weight") and len(info.shape) == 2:
            ctx_by_index.setdefault(info.shape[1], []).append(str(n))
    if len(ctx_by_index) > 1:
        parts = [f"ip_adapter {_indices(idx)} take {dim}-wide context ({base_label(CONTEXT_BASE.get(dim, ''))})"
                 for dim, idx in sorted(ctx_by_index.items())]
        problems.append("The layers mix base models: " + "; ".join(parts) + ". A checkpoint trains one UNet.")
    elif len(ctx_by_index) == 1:
        dim = next(iter(ctx_by_index))
        base = CONTEXT_BASE.get(dim, "")
        count = PROCESSOR_COUNT.get(base)
        if count and highest >= count:
            problems.append(f"Processor indices go up to {highest}, but the {base_label(base)} UNet (context {dim}) "
                            f"has {count} attention processors (0-{count - 1}).")
        for key in _TOKEN_WIDTH_KEYS:
            info = infos.get("image_proj." + key)
            if info is not None and len(info.shape) == 1 and info.shape[0] != dim:
                width = info.shape[0]
                problems.append(f"image_proj makes {width}-wide tokens ({base_label(CONTEXT_BASE.get(width, ''))}) "
                                f"but the attention layers take {dim}-wide context ({base_label(base)}).")
                break
    return problems


def order_keys(keys: Iterable[str], reference: Optional[Template]) -> List[str]:
    """image_proj in the reference's module order, then ip_adapter by index and per-index order."""
    keys = list(keys)
    ref = list(reference.specs) if reference is not None else []
    pos = {k: i for i, k in enumerate(ref)}
    rest_pos: Dict[str, int] = {}
    for i, k in enumerate(ref):
        m = _IP_KEY.match(k)
        if m:
            rest_pos.setdefault(m.group(2), i)
    big = len(ref) + 1
    given = {k: i for i, k in enumerate(keys)}
    proj = sorted((k for k in keys if k.startswith("image_proj.")), key=lambda k: (pos.get(k, big), given[k]))

    def ip_key(k: str):
        n, rest = _IP_KEY.match(k).groups()
        return int(n), pos.get(k, rest_pos.get(rest, big)), given[k]

    ip = sorted((k for k in keys if _IP_KEY.match(k)), key=ip_key)
    return proj + ip
