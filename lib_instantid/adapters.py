"""Loading an adapter file (InstantID's ip-adapter.bin, any IP-Adapter or FaceID file).

``load_adapter`` reads the file safely, builds its image projection from the weights' shapes,
and keeps the per-layer ``to_k_ip``/``to_v_ip`` weights (and FaceID's LoRA) keyed by layer.
Everything stays on the CPU: the projection runs once per generation, and the K/V of the
projected tokens are computed once and moved to the UNet's device (see ``ip_attention``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

from .errors import ModelFileError
from .model_files import Detected, classify, with_variant
from .projection import ProjInfo, build_image_proj
from .weights import TensorInfo, flatten, load_file, split_adapter


@dataclass
class LoadedAdapter:
    name: str
    path: str
    detected: Detected
    proj: torch.nn.Module
    info: ProjInfo
    ip: Dict[int, Tuple[torch.Tensor, torch.Tensor]]           # layer k -> (to_k_ip, to_v_ip)
    lora: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)  # processor index -> tensors

    @property
    def context_dim(self) -> int:
        return next(iter(self.ip.values()))[0].shape[1]


def _split_ip(ip_sd: Dict[str, torch.Tensor], name: str):
    ip: Dict[int, Dict[str, torch.Tensor]] = {}
    lora: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, tensor in ip_sd.items():
        head, _, rest = key.partition(".")
        if not head.isdigit():
            raise ModelFileError(f"'{name}' has an unexpected ip_adapter key '{key}'; it is not a standard "
                                 "IP-Adapter file (a training checkpoint can be converted with "
                                 "python -m lib_instantid.convert).")
        n = int(head)
        if rest in ("to_k_ip.weight", "to_v_ip.weight"):
            ip.setdefault(n, {})[rest] = tensor
        elif "_lora." in rest:
            lora.setdefault(n, {})[rest] = tensor
        else:
            raise ModelFileError(f"'{name}' has an unexpected ip_adapter key '{key}'.")
    pairs = {}
    for n, d in sorted(ip.items()):
        if n % 2 != 1 or len(d) != 2:
            raise ModelFileError(f"'{name}' has incomplete or misplaced IP layers (key index {n}); the file "
                                 "is damaged or not a standard IP-Adapter file.")
        pairs[(n - 1) // 2] = (d["to_k_ip.weight"], d["to_v_ip.weight"])
    if sorted(pairs) != list(range(len(pairs))):
        raise ModelFileError(f"'{name}' is missing IP layers; download the file again.")
    return pairs, lora


def load_adapter(path: str, name: str = "", variant: str = "") -> LoadedAdapter:
    """Load an adapter file; ``variant`` overrides the guess the weights cannot settle."""
    name = name or os.path.basename(path)
    data = load_file(path)
    proj_sd, ip_sd = split_adapter(data)
    if not ip_sd or not proj_sd:
        raise ModelFileError(f"'{name}' is not an IP-Adapter, FaceID or InstantID adapter file (it has no "
                             "image_proj / ip_adapter weights). Check that you picked the adapter, not the "
                             "ControlNet or a LoRA.")
    infos = {k: TensorInfo(tuple(v.shape), v.dtype)
             for k, v in flatten({"image_proj": proj_sd, "ip_adapter": ip_sd}).items()}
    detected = with_variant(classify(infos, os.path.basename(path)), variant)
    if detected.role != "adapter":
        raise ModelFileError(f"'{name}' is {detected.detail or detected.role}; it cannot be used as an adapter.")
    pairs, lora = _split_ip(ip_sd, name)
    ctx = pairs[0][0].shape[1]
    proj, info = build_image_proj(proj_sd, ctx, dtype=torch.float32, device=torch.device("cpu"), file_name=name)
    return LoadedAdapter(name, path, detected, proj, info, pairs, lora)
