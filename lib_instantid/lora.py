"""FaceID's LoRA, applied to the webui's UNet by forward hooks instead of a weight merge.

FaceID files carry a rank-128 LoRA inside ``ip_adapter``: for every attention processor N (attn1
of cross-attention layer k is ``N = 2k``, its attn2 is ``N = 2k+1``) the tensors
``N.to_q_lora.down.weight [rank, in]`` and ``N.to_q_lora.up.weight [out, rank]``, the same for
``to_k_lora``, ``to_v_lora`` and ``to_out_lora``. The official model applies them as
``to_x(h) + scale * up(down(h))`` with no alpha, on every step and every CFG row: it is a change
of the weights, so nothing here follows the step schedule or the cond/uncond labels.

``LoraPatch`` adds ``strength * up(down(input))`` to the output of each attention's ``to_q``,
``to_k``, ``to_v`` and ``to_out[0]`` through forward hooks; no weight is touched, so removing the
hooks restores the UNet exactly.

Order of installation (important): install the LoRA hooks **before** the IP attention hooks of
``ip_attention.IPAttentionPatch`` on the same modules.

- On ``attn2.to_q`` both patches add a forward hook. Forward hooks run in registration order and
  each one sees the output returned by the previous one, so the IP hook that keeps Q then keeps
  the LoRA-modified query, which is what the official ``LoRAIPAttnProcessor`` attends with.
- On ``attn2.to_out[0]`` the IP patch adds a forward *pre*-hook that adds the image term to the
  projection's input; torch passes the pre-hook-modified input to the forward hooks, so the LoRA
  term is ``up(down(text attention + image term))``, again as in the official processor. (Pre-hooks
  always run before forward hooks, so this half does not depend on the order.)

The LoRA tensors are kept on the UNet's device in the UNet's dtype (float16 for fp8 weights) and
moved, once, to the device and compute dtype of the first call that differs (lowvram/medvram move
the UNet between calls; under autocast the compute dtype is the projection's output dtype).

The LoRA's ``to_k``/``to_v`` terms of attn2 see only the text context (the webui projects the text
alone), and the IP keys/values use ``to_k_ip``/``to_v_ip`` without LoRA: as in the official model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import InstantIDError
from .hooks import HookSet
from .unet_layers import CrossAttnLayer

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _linear_of(attn: torch.nn.Module, projection: str) -> torch.nn.Module:
    return attn.to_out[0] if projection == "to_out" else getattr(attn, projection)


def _family_of(context_dim: Optional[int]) -> str:
    return {2048: "SDXL", 768: "SD 1.5", 1024: "SD 2.x"}.get(context_dim or 0, "another model")


class _Term:
    """One projection's LoRA: ``down`` [rank, in] and ``up`` [out, rank] (already times strength)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down = down
        self.up = up

    def __call__(self, module, args, output):
        # The projection's output dtype is its compute dtype (the input's, or autocast's).
        x = args[0].to(output.dtype)
        if self.down.device != x.device or self.down.dtype != x.dtype:  # lowvram/medvram moved the UNet
            self.down = self.down.to(x.device, x.dtype)                 # once: kept for later calls
            self.up = self.up.to(x.device, x.dtype)
        return output + F.linear(F.linear(x, self.down), self.up)


class LoraPatch:
    """FaceID's LoRA on every attention projection of the UNet (see the module docstring).

    ``lora``: processor index N -> ``{"to_q_lora.down.weight": T, "to_q_lora.up.weight": T, ...}``
    (``adapters.LoadedAdapter.lora``). ``strength`` multiplies the LoRA term (official: 1.0).
    """

    def __init__(self, layers: Sequence[CrossAttnLayer], lora: Dict[int, Dict[str, torch.Tensor]],
                 strength: float, name: str = "") -> None:
        self.layers = list(layers)
        self.lora = lora
        self.strength = float(strength)
        self.name = name or "the FaceID model"

    # -- checks -------------------------------------------------------------------------------
    def _targets(self) -> List[Tuple[int, torch.nn.Module]]:
        """(processor index, attention module) for every attention of the UNet, in adapter order."""
        targets = []
        for layer in self.layers:
            targets.append((2 * layer.index, layer.self_attn))
            targets.append((2 * layer.index + 1, layer.module))
        return targets

    def _lora_context_dim(self) -> Optional[int]:
        """The text context size the LoRA was trained with (input size of attn2's to_k LoRA)."""
        down = self.lora.get(1, {}).get("to_k_lora.down.weight")
        return int(down.shape[1]) if down is not None and down.dim() == 2 else None

    def _mismatch(self) -> Optional[str]:
        targets = self._targets()
        if sorted(self.lora) != [n for n, _ in targets]:
            return "a different number of attention processors"
        for n, attn in targets:
            tensors = self.lora[n]
            for projection in PROJECTIONS:
                down = tensors.get(f"{projection}_lora.down.weight")
                up = tensors.get(f"{projection}_lora.up.weight")
                linear = _linear_of(attn, projection)
                if down is None or up is None or down.dim() != 2 or up.dim() != 2:
                    return "missing LoRA tensors"
                if (down.shape[1] != linear.in_features or up.shape[0] != linear.out_features
                        or up.shape[1] != down.shape[0]):
                    return "different layer sizes"
        return None

    def validate(self) -> None:
        """Raise ``InstantIDError`` when the LoRA does not fit the UNet's attention layers."""
        if not self.layers:
            raise InstantIDError("The loaded checkpoint has no cross-attention layers, so the FaceID "
                                 "LoRA cannot be applied; load an SD 1.5 or SDXL checkpoint.")
        problem = self._mismatch()
        if problem is None:
            return
        made_for = _family_of(self._lora_context_dim())
        loaded = _family_of(self.layers[0].context_dim)
        raise InstantIDError(
            f"The FaceID LoRA in '{self.name}' was made for {made_for} ({len(self.lora)} attention "
            f"processors) and does not fit the loaded {loaded} checkpoint ({2 * len(self.layers)} "
            f"attention processors; {problem}). Use the FaceID file made for the loaded checkpoint's "
            "family (SD 1.5 or SDXL).")

    # -- hooks --------------------------------------------------------------------------------
    def install(self, hooks: HookSet) -> None:
        """Validate, then add one forward hook per projection (none at all when strength is 0).

        Call this before ``IPAttentionPatch.install`` on the same ``HookSet``.
        """
        self.validate()
        if self.strength == 0.0:
            return
        for n, attn in self._targets():
            tensors = self.lora[n]
            for projection in PROJECTIONS:
                linear = _linear_of(attn, projection)
                ref = linear.weight
                dtype = ref.dtype if ref.dtype in _FLOAT_DTYPES else torch.float16  # fp8 weights
                down = tensors[f"{projection}_lora.down.weight"]
                up = tensors[f"{projection}_lora.up.weight"]
                up = up.to(device=ref.device, dtype=torch.float32) * self.strength
                hooks.post(linear, _Term(down.to(device=ref.device, dtype=dtype), up.to(dtype)))
