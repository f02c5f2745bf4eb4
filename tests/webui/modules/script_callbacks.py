"""webui modules/script_callbacks.py: callback registries and the CFGDenoiserParams record.

As in the webui, every callback invocation catches and reports exceptions.
"""
from collections import defaultdict

from modules import errors

callbacks = defaultdict(list)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def _add(kind, fn):
    callbacks[kind].append(fn)


def on_cfg_denoiser(fn, *, name=None):
    _add("cfg_denoiser", fn)


def on_ui_settings(fn, *, name=None):
    _add("ui_settings", fn)


def on_app_started(fn, *, name=None):
    _add("app_started", fn)


def on_before_ui(fn, *, name=None):
    _add("before_ui", fn)


def on_infotext_pasted(fn, *, name=None):
    _add("infotext_pasted", fn)


def on_script_unloaded(fn, *, name=None):
    _add("script_unloaded", fn)


def on_model_loaded(fn, *, name=None):
    _add("model_loaded", fn)


def _run(kind, *args):
    for fn in callbacks[kind]:
        try:
            fn(*args)
        except Exception:
            errors.report(f"Error executing callback {kind}", exc_info=True)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def ui_settings_callback():
    _run("ui_settings")


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def before_ui_callback():
    _run("before_ui")


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def script_unloaded_callback():
    for fn in reversed(callbacks["script_unloaded"]):
        fn()


def clear():
    callbacks.clear()
