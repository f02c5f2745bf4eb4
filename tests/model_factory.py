"""Random-weight model files with exactly the layout of the published ones (test data only).

The manifests in ``lib_instantid/manifests`` list every tensor of every published file (key, shape,
dtype) and its container. From them this module builds state dicts and files that a loader cannot
tell from the real thing except by their values:

- ``torch-pickle-nested``: ``{"image_proj": {...}, "ip_adapter": {...}}`` saved with ``torch.save``;
- ``torch-pickle-flat``: one flat dict saved with ``torch.save``;
- ``safetensors-flat``: flat keys (``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight`` ...).

Values are deterministic per (seed, key) and modest: weights ~ N(0, 0.02), norm weights 1 + N(0, 0.02),
biases N(0, 0.02), Resampler latents N(0, 1/dim), integer tensors 0..n-1, scalars 1. Biases and norm
weights are not exactly 0/1 so that a projection that forgets one fails a parity test. Tensors keep
the manifest's dtype (float16 stays float16). ``device="meta"`` gives shape-only tensors, free at any size.

``shape_override(flat_key, shape) -> shape | None`` changes shapes (or drops a tensor when it returns
None); the key is always the flat one (``ip_adapter.1.to_k_ip.weight``) whatever the container.
``reduced_ip_adapter_shapes`` and ``reduced_lora_shapes`` make such overrides for a reduced-width UNet.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "lib_instantid" / "manifests"

ShapeOverride = Callable[[str, Tuple[int, ...]], Optional[Sequence[int]]]
Manifest = Union[str, dict]

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32}


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------


def load_manifest(name: Manifest) -> dict:
    """A manifest by file name, with or without ``.json`` (a dict is returned as is)."""
    if isinstance(name, dict):
        return name
    path = MANIFEST_DIR / (name if name.endswith(".json") else name + ".json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def manifest_names() -> List[str]:
    """Every manifest file name in MANIFEST_DIR, sorted."""
    return sorted(p.name for p in MANIFEST_DIR.glob("*.json"))


def adapter_manifest_names() -> List[str]:
    """Manifests of IP-Adapter style files (an ``image_proj`` + ``ip_adapter`` pair), PuLID excluded."""
    out = []
    for name in manifest_names():
        m = load_manifest(name)
        if "tensors" not in m or "pulid" in m.get("family", ""):
            continue
        if any(k.startswith("image_proj.") for k in _flat_specs(m)):
            out.append(name)
    return out


def _flat_specs(manifest: dict, include_optional: bool = False,
                tensors_field: str = "tensors") -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{flat key: (shape, dtype name)} in manifest order; nested containers get 'outer.inner' keys."""
    specs: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if "shape" in v and "dtype" in v:
                specs[prefix + k] = (tuple(v["shape"]), v["dtype"])
            else:
                walk(v, prefix + k + ".")

    walk(manifest[tensors_field], "")
    if include_optional and manifest.get("optional_tensors"):
        walk(manifest["optional_tensors"], "")
    return specs


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def random_tensor(key: str, shape: Sequence[int], dtype: torch.dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """One tensor, deterministic in (seed, key), scaled like a trained weight of its kind."""
    shape = tuple(int(s) for s in shape)
    if str(device) == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if not dtype.is_floating_point:
        n = shape[-1] if shape else 1
        t = torch.arange(n, dtype=dtype).expand(shape).clone() if shape else torch.tensor(0, dtype=dtype)
        return t.to(device)
    if not shape:
        return torch.tensor(1.0, dtype=dtype, device=device)
    noise = torch.randn(shape, generator=_generator(seed, key))
    last = key.rsplit(".", 1)[-1]
    if last == "latents":
        t = noise * shape[-1] ** -0.5
    elif len(shape) == 1 and last == "weight":  # LayerNorm / GroupNorm scale
        t = 1.0 + 0.02 * noise
    else:  # weights, biases, embeddings
        t = 0.02 * noise
    return t.to(device=device, dtype=dtype)


def state_dict_from_manifest(
    manifest: Manifest,
    device: Union[str, torch.device] = "cpu",
    shape_override: Optional[ShapeOverride] = None,
    seed: int = 0,
    include_optional: bool = False,
    tensors_field: str = "tensors",
) -> dict:
    """The file's content as a state dict: nested for ``torch-pickle-nested``, flat otherwise.

    include_optional adds the manifest's ``optional_tensors``; tensors_field picks another tensor
    list of the manifest (e.g. ``alternative_tensors_observed_2024_01`` of the SDXL FaceID LoRAs).
    """
    m = load_manifest(manifest)
    nested = m["container"] == "torch-pickle-nested"
    out: dict = {}
    for key, (shape, dtype_name) in _flat_specs(m, include_optional, tensors_field).items():
        if shape_override is not None:
            new = shape_override(key, shape)
            if new is None:
                continue
            shape = tuple(new)
        t = random_tensor(key, shape, _DTYPES[dtype_name], device, seed)
        if nested:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = t
        else:
            out[key] = t
    return out


def write_model_file(manifest: Manifest, path: Union[str, Path], **kwargs) -> Path:
    """Write a random-weight file in the manifest's container (kwargs as for state_dict_from_manifest)."""
    m = load_manifest(manifest)
    kwargs["device"] = "cpu"
    sd = state_dict_from_manifest(m, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if m["container"] in ("torch-pickle-nested", "torch-pickle-flat"):
        torch.save(sd, path)
    elif m["container"] == "safetensors-flat":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    else:
        raise ValueError(f"{m.get('file')}: container {m['container']!r} has no tensors to write")
    return path


def adapter_parts(sd: dict) -> Tuple[dict, dict]:
    """(image_proj, ip_adapter) of a nested or flat adapter state dict."""
    if "image_proj" in sd and isinstance(sd["image_proj"], dict):
        return sd["image_proj"], sd.get("ip_adapter", {})
    parts: Dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        outer, _, inner = k.partition(".")
        if outer in parts:
            parts[outer][inner] = v
    return parts["image_proj"], parts["ip_adapter"]


def only_image_proj(key: str, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """A shape_override that keeps the image_proj tensors only (cheap numerics on big SDXL files)."""
    return shape if key.startswith("image_proj.") else None


# ----------------------------------------------------------------------------------------------
# Reduced-UNet shapes
# ----------------------------------------------------------------------------------------------


def unet_attention_layers(unet) -> List[Tuple[str, int]]:
    """(module path, inner dim) of every attention layer of a diffusers UNet, in attn_processors order.

    The position in this list is the ``ip_adapter.N`` index. Duck-typed: needs ``attn_processors``
    and ``get_submodule``.
    """
    layers = []
    for name in unet.attn_processors:
        path = name[: -len(".processor")]
        layers.append((path, unet.get_submodule(path).to_q.out_features))
    return layers


_IP_KEY = re.compile(r"^(ip_adapter|id_adapter_attn_layers)\.(\d+)\.(.+)$")


def reduced_ip_adapter_shapes(inner_dims_by_index: Dict[int, int]) -> ShapeOverride:
    """A shape_override for the ``ip_adapter`` tensors of a UNet with other inner dims / fewer layers.

    inner_dims_by_index maps processor index -> inner dim of the reduced UNet (e.g.
    ``dict(enumerate(d for _, d in unet_attention_layers(unet)))``). Indices missing from it are
    dropped. Context dims (to_k_ip / to_v_ip inputs, attn2 to_k / to_v LoRA inputs) are kept.
    Odd indices are attn2 (cross-attention), even ones attn1, as in both SD1.5 and SDXL.
    """

    def override(key: str, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        m = _IP_KEY.match(key)
        if not m:
            return shape
        idx, rest = int(m.group(2)), m.group(3)
        if idx not in inner_dims_by_index:
            return None
        new = inner_dims_by_index[idx]
        if rest.endswith("up.weight") or rest.split(".")[0] in ("to_k_ip", "to_v_ip", "id_to_k", "id_to_v"):
            return (new,) + tuple(shape[1:])
        is_context_input = rest.startswith(("to_k_lora.down", "to_v_lora.down")) and idx % 2 == 1
        if rest.endswith("down.weight") and not is_context_input:
            return (shape[0], new)
        return shape

    return override


def reduced_lora_shapes(inner_dims_by_module: Dict[str, int]) -> ShapeOverride:
    """A shape_override for kohya-style FaceID LoRA files (``lora_unet_<path>_<to_q|...>.lora_*``).

    inner_dims_by_module maps diffusers module path (``...transformer_blocks.0.attn2``) -> inner dim,
    e.g. ``dict(unet_attention_layers(unet))``. Modules missing from it are dropped; attn2 to_k / to_v
    keep their context-dim input.
    """
    table = {}
    for path, dim in inner_dims_by_module.items():
        flat = path.replace(".", "_")
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            keeps_input = path.endswith("attn2") and proj in ("to_k", "to_v")
            table[f"lora_unet_{flat}_{proj}"] = (dim, keeps_input)

    def override(key: str, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        base, _, rest = key.partition(".")
        if not base.startswith("lora_unet_"):
            return shape
        if base not in table:
            return None
        dim, keeps_input = table[base]
        if rest == "lora_up.weight":
            return (dim, shape[1])
        if rest == "lora_down.weight" and not keeps_input:
            return (shape[0], dim)
        return shape

    return override
