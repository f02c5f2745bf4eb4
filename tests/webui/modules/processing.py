"""webui modules/processing.py: the generation flow around the UNet (latents stand in for images).

``process_images(p)``: ``scripts.process`` -> for each batch: ``before_process_batch``,
``process_batch``, ``p.sample(...)`` (looked up on the instance, called with keyword arguments),
``postprocess_batch`` -> ``scripts.postprocess``. Hook exceptions are reported and ignored; an
exception from ``p.sample`` propagates and ``postprocess`` does not run (v1.10.1 process_images_inner).

``StableDiffusionProcessingTxt2Img.sample``: a new sampler, ``process_before_every_sampling``
(1.10+), sampling; with hires fix ``sample_hr_pass``: ``is_hr_pass = True``, latent upscale, a new
sampler, hires conds, ``before_hr``, ``process_before_every_sampling`` again, img2img sampling at
the hires size, ``is_hr_pass = False`` (not in a finally).
``StableDiffusionProcessingImg2Img``: samples from ``init_latent`` at p.width x p.height (for
"only masked" inpainting the crop is resized to exactly that size before encoding).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from modules import shared
from modules.sd_samplers import EulerSampler


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: Any = None
    c: Any = None                 # MultiCond
    uc: Any = None                # tensor or DictWithShape
    width: int = 128
    height: int = 128
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 4
    cfg_scale: float = 5.0
    seed: int = 1
    s_min_uncond: float = 0.0
    denoising_strength: float = 0.75
    scripts: Any = None
    script_args: tuple = ()
    extra_generation_params: Dict[str, Any] = field(default_factory=dict)
    is_api: bool = False
    is_hr_pass: bool = False
    sampler: Any = None
    seeds: List[int] = field(default_factory=list)
    closed: bool = False

    def noise(self, h, w, seed_offset=0):
        """One generator per image, seeded by that image's seed (so batches match single images)."""
        rows = []
        for i in range(self.batch_size):
            seed = (self.seeds[i] if i < len(self.seeds) else self.seed + i) + 1000 * seed_offset
            rows.append(torch.randn(4, h // 8, w // 8, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    def close(self):
        self.closed = True


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_c: Any = None
    hr_uc: Any = None
    hr_upscale_to_x: int = 0
    hr_upscale_to_y: int = 0

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = EulerSampler(self.sd_model)
        x = self.noise(self.height, self.width)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=image_cond)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.hr_upscale_to_x = int(self.width * self.hr_scale)
        self.hr_upscale_to_y = int(self.height * self.hr_scale)
        self.sampler = EulerSampler(self.sd_model)
        samples = F.interpolate(samples, size=(self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8), mode="bilinear")
        noise = self.noise(self.hr_upscale_to_y, self.hr_upscale_to_x, seed_offset=1)
        if self.hr_c is None:
            self.hr_c, self.hr_uc = self.c, self.uc
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        image_cond = torch.zeros(samples.shape[0], 5, 1, 1)
        out = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                          steps=self.hr_second_pass_steps or self.steps, image_conditioning=image_cond)
        self.is_hr_pass = False
        return out


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_latent: Optional[torch.Tensor] = None
    init_images: list = field(default_factory=list)
    image_mask: Any = None
    inpaint_full_res: bool = False

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = EulerSampler(self.sd_model)
        x = self.init_latent
        noise = self.noise(self.height, self.width)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=conditioning, uc=unconditional_conditioning)
        image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        return self.sampler.sample_img2img(self, x, noise, conditioning, unconditional_conditioning,
                                           image_conditioning=image_cond)


@dataclass
class Processed:
    images: list
    extra_generation_params: dict


def process_images(p):
    p.sd_model = p.sd_model or shared.sd_model
    if p.scripts is not None:
        p.scripts.process(p)
    outputs = []
    for n in range(p.n_iter):
        if shared.state.interrupted:
            break
        p.seeds = [p.seed + n * p.batch_size + i for i in range(p.batch_size)]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=[], seeds=p.seeds, subseeds=[])
            p.scripts.process_batch(p, batch_number=n, prompts=[], seeds=p.seeds, subseeds=[])
        with torch.no_grad():   # process_images_inner samples under torch.no_grad()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=[],
                               subseed_strength=0.0, prompts=[])
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, samples, batch_number=n)
        outputs.append(samples)
    res = Processed(outputs, dict(p.extra_generation_params))
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
