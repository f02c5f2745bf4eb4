"""The sampler side: k-diffusion's CompVisDenoiser (the CFG denoiser's ``inner_model``), the model
wrappers between it and the UNet, and an Euler sampler.

- ``CompVisDenoiser(nn.Module).forward(input, sigma, **kwargs)`` scales its input
  (``eps = apply_model(input * c_in, sigma_to_t(sigma), **kwargs); return input + eps * c_out``),
  so the UNet never receives the tensor the CFG denoiser passed (k_diffusion/external.py).
- ``SDXLModel.apply_model`` -> ``OpenAIWrapper``: ``x = cat((x, c.get("concat", empty)))``;
  ``diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"])`` (sgm wrappers.py,
  webui sd_models_xl.py; A1111 passes "c_concat", which OpenAIWrapper ignores).
- ``SD1Model.apply_model`` -> ``DiffusionWrapper``: ``diffusion_model(x, t, context=cat(c_crossattn, 1))``.
- The sampler sets ``shared.state.sampling_step`` per step and turns the webui's
  InterruptedException into "return the last latent" (``Sampler.launch_sampling``).
"""
import torch
from torch import nn

from modules import shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser, InterruptedError_


def _schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


class CompVisDenoiser(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.register_buffer("sigmas", _schedule())
        self.register_buffer("log_sigmas", self.sigmas.log())

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def forward(self, input, sigma, **kwargs):
        c_in = (1.0 / (sigma ** 2 + 1.0) ** 0.5)[:, None, None, None]
        eps = self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input - eps * sigma[:, None, None, None]


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None), **kwargs)


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class SDXLModel(nn.Module):
    is_sdxl, is_sd1, is_sd2 = True, False, False

    def __init__(self, unet, empty_prompt=None):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.cond_stage_model_empty_prompt = empty_prompt
        self.sd_checkpoint_info = type("Info", (), {"name_for_extra": "sdxl_test", "title": "sdxl_test"})()

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)


class SD1Model(nn.Module):
    is_sdxl, is_sd1, is_sd2 = False, True, False

    def __init__(self, unet, empty_prompt=None):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model_empty_prompt = empty_prompt
        self.sd_checkpoint_info = type("Info", (), {"name_for_extra": "sd15_test", "title": "sd15_test"})()

    def apply_model(self, x, t, cond):
        return self.model(x, t, **cond)


class EulerSampler:
    def __init__(self, sd_model):
        self.model_wrap = CompVisDenoiser(sd_model)
        self.model_wrap_cfg = CFGDenoiser(self, self.model_wrap)
        self.last_latent = None

    def sigmas(self, steps):
        s = self.model_wrap.sigmas
        return torch.cat([torch.linspace(float(s[-1]), float(s[0]) * 1.5, steps), torch.zeros(1)])

    def launch(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning):
        cfg = self.model_wrap_cfg
        cfg.p, cfg.step, cfg.total_steps = p, 0, len(sigmas) - 1
        shared.state.sampling_steps = len(sigmas) - 1
        self.last_latent = x
        try:
            for i in range(len(sigmas) - 1):
                shared.state.sampling_step = i
                sigma = sigmas[i] * torch.ones(x.shape[0])
                denoised = cfg(x, sigma, uncond=unconditional_conditioning, cond=conditioning,
                               cond_scale=p.cfg_scale, s_min_uncond=p.s_min_uncond, image_cond=image_conditioning)
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
                self.last_latent = x
        except InterruptedError_:
            return self.last_latent
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sigmas = self.sigmas(steps or p.steps)
        return self.launch(p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        t_enc = max(1, int(min(p.denoising_strength, 0.999) * steps))
        sigmas = self.sigmas(steps)[steps - t_enc - 1:]
        return self.launch(p, x + noise * sigmas[0], sigmas, conditioning, unconditional_conditioning,
                           image_conditioning)
