"""One generation's patch of the webui's UNet: install, follow the sampler, remove.

``GenerationPatch`` is the only object that touches the webui's models. It is used as::

    patch = GenerationPatch(unet, attention_units, control_units)
    with patch:                         # installs hooks; removes them on any exit
        ... sampling; for every CFG step the glue calls patch.begin_step(...) ...

Everything it installs is a hook (see ``hooks.py``), so leaving the ``with`` block - normally, by
an exception, an interrupt or an out-of-memory error - restores the models exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import InstantIDError
from .hooks import HookSet, purge_stale_hooks
from .ip_attention import AttentionUnit, CallState, IPAttentionPatch
from .residuals import ControlUnit, ResidualPatch
from .rows import RowLabeler
from .unet_layers import CrossAttnLayer, cross_attention_layers, input_output_blocks, unet_family


@dataclass
class Schedule:
    """Strength of a unit over the steps of a pass: ``weight`` inside [start, end], else 0."""

    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    in_hires: bool = True

    def at(self, fraction: float, is_hires: bool) -> float:
        if is_hires and not self.in_hires:
            return 0.0
        if fraction < self.start - 1e-9 or fraction > self.end + 1e-9:
            return 0.0
        return float(self.weight)


def _check_attention_unit(unit: AttentionUnit, layers: Sequence[CrossAttnLayer]) -> None:
    family = None
    if len(unit.weights) != len(layers):
        family = f"{len(unit.weights)} cross-attention layers"
    else:
        for layer in layers:
            wk, _ = unit.weights.get(layer.index, (None, None))
            if wk is None or tuple(wk.shape) != (layer.inner_dim, layer.context_dim):
                family = "a differently shaped UNet"
                break
    if family is not None:
        raise InstantIDError(
            f"'{unit.name}' was made for {family}, but the loaded checkpoint's UNet has "
            f"{len(layers)} cross-attention layers with context size {layers[0].context_dim}. "
            "Load a checkpoint of the model family the adapter was trained for (SD 1.5 or SDXL).")


class GenerationPatch:
    def __init__(self, unet: torch.nn.Module,
                 attention: Sequence[Tuple[AttentionUnit, Schedule]] = (),
                 control: Sequence[Tuple[ControlUnit, Schedule]] = (),
                 loras: Sequence = ()) -> None:
        self.unet = unet
        self.attention = list(attention)
        self.control = list(control)
        self.loras = list(loras)      # FaceID LoRAs (lora.LoraPatch): every step, every row
        self.state = CallState()
        self.rows = RowLabeler()
        self.hooks = HookSet()
        self.is_hires = False
        self._labelled_models: List[torch.nn.Module] = []
        self.layers: List[CrossAttnLayer] = []

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> "GenerationPatch":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        purge_stale_hooks(self.unet)
        self.layers = cross_attention_layers(self.unet)
        unet_family(self.unet)  # raises a readable error for a UNet without cross-attention
        for unit, _ in self.attention:
            _check_attention_unit(unit, self.layers)
        for lora in self.loras:
            lora.validate()
        n_inputs = len(input_output_blocks(self.unet)[0]) if self.control else 0
        ref = self.layers[0].module.to_k.weight
        dtype = ref.dtype if ref.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
        try:
            for unit, _ in self.attention:
                unit.prepare(self.layers, ref.device, dtype)
            for unit, _ in self.control:
                self._check_control_unit(unit, n_inputs)
            self.state.unit_scales = [0.0] * len(self.attention)
            self.state.control_scales = [0.0] * len(self.control)
            for lora in self.loras:       # first: the IP hooks must see the LoRA-modified query
                lora.install(self.hooks)
            if self.attention:
                IPAttentionPatch(self.layers, [u for u, _ in self.attention], self.state).install(self.hooks)
            if self.control:
                ResidualPatch(self.unet, [u for u, _ in self.control], self.state).install(self.hooks)
        except BaseException:
            self.remove()
            raise

    def _check_control_unit(self, unit: ControlUnit, n_inputs: int) -> None:
        expected = len(getattr(unit.net, "controlnet_down_blocks", ())) or n_inputs
        if expected != n_inputs:
            raise InstantIDError(
                f"'{unit.name}' gives {expected} residuals but the loaded checkpoint's UNet has "
                f"{n_inputs} input blocks; IdentityNet needs an SDXL checkpoint.")

    def remove(self) -> None:
        self.hooks.remove()
        self.rows.end()
        self.state.set_call(None)
        self._labelled_models.clear()
        for unit, _ in self.attention:     # per-generation tensors on the GPU
            unit.kv.clear()
            unit._masks.clear()

    # -- following the sampler --------------------------------------------------------------
    def begin_pass(self, is_hires: bool) -> None:
        self.is_hires = bool(is_hires)

    def begin_step(self, x_in: torch.Tensor, n_cond: int, step: int, total_steps: int,
                   model: Optional[torch.nn.Module] = None) -> None:
        """Called for every CFG step with the step's full ``x_in`` (cond rows first).

        ``model`` is the module the CFG denoiser calls with slices of ``x_in`` (the webui's
        ``denoiser.inner_model``); its calls are labelled row by row.
        """
        fraction = step / max(int(total_steps), 1)
        self.state.unit_scales = [s.at(fraction, self.is_hires) for _, s in self.attention]
        self.state.control_scales = [s.at(fraction, self.is_hires) for _, s in self.control]
        self.state.latent_hw = (int(x_in.shape[-2]), int(x_in.shape[-1]))
        self.rows.begin_step(x_in, n_cond)
        if model is not None and not any(m is model for m in self._labelled_models):
            self._labelled_models.append(model)
            self._label_calls_of(model)

    def _label_calls_of(self, model: torch.nn.Module) -> None:
        def before(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor):
                self.state.set_call(self.rows.kinds_for_call(x))
            return None

        def after(module, args, kwargs, output):
            self.state.set_call(None)
            return None

        self.hooks.pre(model, before, with_kwargs=True)
        self.hooks.post(model, after, with_kwargs=True, always_call=True)
