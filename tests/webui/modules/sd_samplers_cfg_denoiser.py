"""webui modules/sd_samplers_cfg_denoiser.py: ``CFGDenoiser.forward`` and its batch layouts.

Reproduces v1.10.1 ``CFGDenoiser.forward`` (L156-311) step by step, with two simplifications that do
not change any layout: conds arrive already reconstructed (``MultiCond`` = the result of
``prompt_parser.reconstruct_multicond_batch``), and there is no refiner switch or mask blend.
v1.9.4 differs only in the skip-uncond test (no ``skip_early_cond`` / ``s_min_uncond_all``); set
``CFGDenoiser.v19 = True`` for it.
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch

from modules import script_callbacks, shared
from modules.script_callbacks import CFGDenoiserParams


class DictWithShape(dict):
    """prompt_parser.DictWithShape: SDXL conds {"crossattn", "vector"}; ``.shape`` = crossattn's."""

    @property
    def shape(self):
        return self["crossattn"].shape


@dataclass
class MultiCond:
    conds_list: List[List[Tuple[int, float]]]   # per image: (row index in tensor, weight)
    tensor: object                               # [rows, 77k, C] or DictWithShape


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return DictWithShape({key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()})


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return DictWithShape({key: vec[a:b] for key, vec in cond.items()})


def pad_cond(tensor, repeats, empty):
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], dim=1)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


class CFGDenoiser(torch.nn.Module):
    v19 = False

    def __init__(self, sampler, inner_model):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = inner_model
        self.p = None
        self.step = 0
        self.total_steps = 1
        self.calls = []          # the true kind (0 cond, 1 uncond) of each row of every inner_model call

    @property
    def inner_model(self):
        return self.model_wrap

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        is_dict = isinstance(uncond, dict)
        vec = uncond["crossattn"] if is_dict else uncond
        if vec.shape[1] < cond.shape[1]:
            last = vec[:, -1:]
            vec = torch.hstack([vec, last.repeat([1, cond.shape[1] - vec.shape[1], 1])])
        elif vec.shape[1] > cond.shape[1]:
            vec = vec[:, :cond.shape[1]]
        if is_dict:
            uncond["crossattn"] = vec
        else:
            uncond = vec
        return cond, uncond

    def _call(self, x, sigma, cond, first_row):
        n_cond = self._n_cond
        self.calls.append([0 if r < n_cond else 1 for r in range(first_row, first_row + x.shape[0])])
        return self.inner_model(x, sigma, cond=cond)

    def forward(self, x, sigma, uncond, cond: MultiCond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise InterruptedError_()
        conds_list, tensor = cond.conds_list, cond.tensor
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        make_condition_dict = (
            (lambda c_crossattn, c_concat: {**c_crossattn, "c_concat": [c_concat]})
            if isinstance(uncond, dict) else
            (lambda c_crossattn, c_concat: {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}))

        self._n_cond = sum(repeats)
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_cond])

        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                   shared.state.sampling_steps, tensor, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        opts = shared.opts
        if not self.v19 and opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or (not self.v19 and opts.s_min_uncond_all)) and s_min_uncond > 0 \
                and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self._call(x_in, sigma_in, make_condition_dict(cond_in, image_cond_in), 0)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self._call(x_in[a:b], sigma_in[a:b],
                                            make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]), a)
        else:
            x_out = torch.zeros_like(x_in)
            bs = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], bs):
                b = min(a + bs, tensor.shape[0])
                x_out[a:b] = self._call(x_in[a:b], sigma_in[a:b],
                                        make_condition_dict(subscript_cond(tensor, a, b), image_cond_in[a:b]), a)
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self._call(x_in[-n:], sigma_in[-n:], make_condition_dict(uncond, image_cond_in[-n:]),
                                        x_in.shape[0] - n)

        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        self.step += 1
        return denoised


class InterruptedError_(BaseException):
    """sd_samplers_common.InterruptedException (a BaseException)."""
