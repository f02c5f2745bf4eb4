"""InstantID together with sd-webui-controlnet in the same generation.

A stand-in reproduces the mechanism sd-webui-controlnet v1.1.455 uses (scripts/hook.py, read, not
copied): in ``process`` it wraps ``p.sample`` to prepend a marker token row (+1024 cond / -1024
uncond) to every cond's text context, and replaces ``diffusion_model.forward`` (instance attribute)
with its own UNet forward that strips the marker, derives a per-row cond mark and calls the blocks
as modules, adding its own residual to cond rows; ``postprocess`` restores the forward.
Both orders of the two scripts are run. Our labels must stay right, its forward must keep its text
context, and both contributions must be present.
"""

import pytest
import torch

from lib_instantid.hooks import count_hooks

from test_generation import Recorder, b64, conds, record_truth

gr = pytest.importorskip("gradio")
pytest.importorskip("insightface")

MARK = 1024.0


class FakeControlNet:
    """Only what matters for coexistence: marker tokens, a replaced UNet forward, its own residual."""

    def __init__(self, unet, strength=0.05):
        self.unet, self.strength, self.seen_context_lengths = unet, strength, []

    def title(self):
        return "ControlNet"

    def process(self, p, *args):
        original_sample = p.sample

        def marked_sample(**kwargs):
            from modules.sd_samplers_cfg_denoiser import DictWithShape, MultiCond

            def mark(d, value):
                ctx = d["crossattn"]
                return DictWithShape(crossattn=torch.cat([torch.full_like(ctx[:, :1], value), ctx], 1),
                                     vector=d["vector"])
            c = kwargs["conditioning"]
            kwargs["conditioning"] = MultiCond(c.conds_list, mark(c.tensor, MARK))
            kwargs["unconditional_conditioning"] = mark(kwargs["unconditional_conditioning"], -MARK)
            return original_sample(**kwargs)

        p.sample = marked_sample
        unet, outer = self.unet, self

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            from ldm.modules.diffusionmodules.util import timestep_embedding
            mark = context[:, 0, :]
            context = context[:, 1:, :]
            outer.seen_context_lengths.append(context.shape[1])
            is_cond = ((mark + MARK).abs().mean(dim=1) > 1e-3).float()[:, None, None, None]
            emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
            emb = emb + unet.label_emb(y)
            hs, h = [], x
            for module in unet.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = unet.middle_block(h, emb, context) + outer.strength * is_cond
            for module in unet.output_blocks:
                h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
            return unet.out(h)

        unet._original_forward = unet.forward
        unet.forward = forward

    def postprocess(self, p, processed, *args):
        self.unet.forward = self.unet._original_forward
        del self.unet._original_forward


def _runner(webui, script_module, unet, cn_first):
    from modules import scripts
    ours = script_module.InstantIDScript()
    cn = FakeControlNet(unet)
    cn_script = type("CNScript", (scripts.Script,), {
        "title": lambda self: "ControlNet", "ui": lambda self, is_img2img: [],
        "process": lambda self, p, *a: cn.process(p), "postprocess": lambda self, p, r, *a: cn.postprocess(p, r)})()
    order = [cn_script, ours] if cn_first else [ours, cn_script]
    runner = scripts.ScriptRunner(order)
    with gr.Blocks():
        runner.setup_ui(is_img2img=False)
    return runner, ours, cn


@pytest.mark.parametrize("cn_first", [True, False])
def test_both_extensions_in_one_generation(webui, script_module, sdxl_unet, astronaut, cn_first, monkeypatch):
    from modules import processing, shared
    from modules.sd_samplers import SDXLModel

    shared.sd_model = SDXLModel(sdxl_unet, empty_prompt=torch.zeros(1, 77, 2048))
    shared.opts.batch_cond_uncond = False           # separate calls: where per-call labels matter
    runner, ours, cn = _runner(webui, script_module, sdxl_unet, cn_first)
    truth = record_truth(monkeypatch)
    hooks_before = count_hooks(sdxl_unet)
    rec = Recorder(script_module, sdxl_unet)

    def generate(enabled):
        c, uc = conds(1)
        args = list(runner.default_args())
        args[ours.args_from] = {"enabled": enabled, "image": b64(astronaut)}
        p = processing.StableDiffusionProcessingTxt2Img(c=c, uc=uc, seed=3, scripts=runner, script_args=tuple(args))
        rec.p = p
        return torch.cat(processing.process_images(p).images)

    try:
        with_both = generate(True)
        n_calls = len(rec.seen)
        cn_only = generate(False)
    finally:
        rec.close()
        shared.opts.batch_cond_uncond = True
    assert rec.seen[:n_calls] == [c for calls in truth[:1] for c in calls]   # labels right under its marker
    assert set(cn.seen_context_lengths) == {77}            # its text context kept (marker stripped by it)
    assert (with_both - cn_only).abs().max() > 1e-3       # our part acted
    # its forward was restored by itself (as the bound original, like the real one does); ours are gone
    assert getattr(sdxl_unet.forward, "__func__", None) is type(sdxl_unet).forward
    vars(sdxl_unet).pop("forward", None)
    assert count_hooks(sdxl_unet) == hooks_before
