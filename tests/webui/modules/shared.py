"""webui modules/shared.py: ``opts``, ``cmd_opts``, ``state``, ``sd_model`` (set by tests)."""
import argparse

from modules.options import OptionInfo, Options

# the v1.10.1 defaults of the options the CFG denoiser reads (modules/shared_options.py)
opts = Options({
    "batch_cond_uncond": OptionInfo(True),
    "pad_cond_uncond": OptionInfo(False),
    "pad_cond_uncond_v0": OptionInfo(False),
    "s_min_uncond": OptionInfo(0.0),
    "s_min_uncond_all": OptionInfo(False),
    "skip_early_cond": OptionInfo(0.0),
    "hires_fix_use_firstpass_conds": OptionInfo(False),
})

cmd_opts = argparse.Namespace(lowvram=False, medvram=False, medvram_sdxl=False, no_half=True,
                              use_cpu=["all"], api=True, nowebui=False, controlnet_dir=None,
                              disable_safe_unpickle=False)


class State:
    interrupted = False
    skipped = False
    stopping_generation = False
    sampling_step = 0
    sampling_steps = 0

    def interrupt(self):
        self.interrupted = True


state = State()
sd_model = None
