"""Reading model files safely: .safetensors, and .bin/.pt/.pth pickles without running code.

Pickles are read with torch's weights-only unpickler, which only rebuilds tensors and plain
containers: a file that carries code is refused with a message and nothing runs. It is called as
``torch.serialization.load`` so that a webui that replaced ``torch.load`` does not get in between.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from .errors import ModelFileError

PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt")
SAFE_EXTS = (".safetensors",)
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype


def _refused(path: str, exc: BaseException) -> ModelFileError:
    return ModelFileError(
        f"Refused to load '{os.path.basename(path)}': it contains Python objects other than tensors, "
        "which could run code on your computer. Download the file again from its official page, "
        f"or use its .safetensors version. (Detail: {str(exc).splitlines()[0][:200]})")


def unreadable_error(path: str, exc: BaseException) -> ModelFileError:
    return ModelFileError(f"Could not read '{path}': {str(exc).splitlines()[0][:200]}. The file may be "
                          "incomplete or damaged; download it again.")


def _load_pickle(path: str, map_location, mmap: bool):
    try:
        return torch.serialization.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        if mmap and "mmap" in str(exc):
            return None  # legacy (pre-zip) format: cannot be mapped
        raise unreadable_error(path, exc) from None


def load_pickle_mapped(path: str):
    """A pickle's content with its tensors memory-mapped (not read until used); None for the legacy
    (pre-zip) format, which cannot be mapped."""
    return _load_pickle(path, "cpu", mmap=True)


def load_file(path: str, device: str = "cpu") -> dict:
    """The file's content as saved: a flat dict for safetensors, the pickled dict otherwise."""
    if not os.path.isfile(path):
        raise ModelFileError(f"Model file not found: '{path}'. Check the file name and folder.")
    if path.lower().endswith(SAFE_EXTS):
        from safetensors.torch import load_file as st_load
        try:
            return st_load(path, device=device)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise unreadable_error(path, exc) from None
    if not path.lower().endswith(PICKLE_EXTS):
        raise ModelFileError(f"'{os.path.basename(path)}' is not a .safetensors, .bin, .pt or .pth file.")
    data = _load_pickle(path, device, mmap=False)
    if not isinstance(data, dict):
        raise ModelFileError(f"'{os.path.basename(path)}' does not hold a dictionary of tensors, so it "
                             "is not an adapter or ControlNet file.")
    return data


def flatten(data: Mapping, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Nested dicts of tensors -> one flat dict with dotted keys (non-tensors are dropped)."""
    flat: Dict[str, torch.Tensor] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
    return flat


def read_tensor_infos(path: str) -> Optional[Dict[str, TensorInfo]]:
    """Flat key -> shape/dtype without reading the weights; None if that is not possible cheaply."""
    lower = path.lower()
    if lower.endswith(SAFE_EXTS):
        from safetensors import safe_open
        try:
            infos = {}
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    infos[key] = TensorInfo(tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), torch.float32))
            return infos
        except Exception as exc:
            raise unreadable_error(path, exc) from None
    if lower.endswith(PICKLE_EXTS):
        data = _load_pickle(path, "meta", mmap=True)
        if data is None:
            return None
        if not isinstance(data, Mapping):
            return {}
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in flatten(data).items()}
    return None


def split_adapter(flat_or_nested: Mapping) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(image_proj, ip_adapter)`` from a nested IP-Adapter dict or its flat safetensors form."""
    if "image_proj" in flat_or_nested and isinstance(flat_or_nested["image_proj"], Mapping):
        return dict(flat_or_nested["image_proj"]), dict(flat_or_nested.get("ip_adapter", {}))
    proj, ip = {}, {}
    for key, value in flat_or_nested.items():
        if key.startswith("image_proj."):
            proj[key[len("image_proj."):]] = value
        elif key.startswith("ip_adapter."):
            ip[key[len("ip_adapter."):]] = value
    return proj, ip
