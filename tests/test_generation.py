"""Whole generations through the webui test double, with the real script, model files and UNet.

Checks, in every batch layout the webui produces:
- the row labels the patch used in every UNet call equal the truth the CFG denoiser knows
  (cond rows = the first rows of x_in; the double records each call's rows);
- layouts that are mathematically equal give the same latents, with the extension on as off;
- after the generation (also after an exception or interrupt) no hook is left and a generation
  with the panel disabled is bit-identical to one made before the extension was used.
"""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib_instantid.hooks import count_hooks

pytest.importorskip("insightface")
gr = pytest.importorskip("gradio")


def b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def script_env(script_module, unet, astronaut):
    """The script with its UI built (as the webui does at start), ready for process_images."""
    from modules import scripts
    script = script_module.InstantIDScript()
    runner = scripts.ScriptRunner([script])
    with gr.Blocks():
        runner.setup_ui(is_img2img=False)
    return {"runner": runner, "script": script, "module": script_module, "unet": unet, "face": b64(astronaut)}


@pytest.fixture(scope="module")
def env(webui, script_module, sdxl_unet, astronaut):
    from modules import shared
    from modules.sd_samplers import SDXLModel

    shared.sd_model = SDXLModel(sdxl_unet, empty_prompt=torch.zeros(1, 77, 2048))
    return script_env(script_module, sdxl_unet, astronaut)


class Recorder:
    """Records the row kinds the patch holds at every UNet call."""

    def __init__(self, module, unet):
        self.module, self.seen = module, []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, mod, args):
        p = self.p
        patch = getattr(p, self.module.PATCH_ATTR, None) if p is not None else None
        kinds = patch.state.kinds if patch is not None else None
        self.seen.append(None if kinds is None else kinds.tolist())

    def close(self):
        self.handle.remove()


def conds(batch, and_rows=1, cond_tokens=77, uncond_tokens=77, seed=0):
    from modules.sd_samplers_cfg_denoiser import DictWithShape, MultiCond
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, cond_tokens, 2048, generator=g).repeat(batch * and_rows, 1, 1)
    vec = torch.randn(1, 2816, generator=g).repeat(batch * and_rows, 1)
    unctx = torch.randn(1, uncond_tokens, 2048, generator=g).repeat(batch, 1, 1)
    unvec = torch.randn(1, 2816, generator=g).repeat(batch, 1)
    conds_list = [[(i * and_rows + j, 1.0 / and_rows) for j in range(and_rows)] for i in range(batch)]
    return MultiCond(conds_list, DictWithShape(crossattn=ctx, vector=vec)), DictWithShape(crossattn=unctx, vector=unvec)


def run(env, enabled=True, batch=1, seed=7, kind="txt2img", record=None, opts=None, args=None, **kw):
    from modules import processing, shared

    shared.state.interrupted = False
    for name, value in {"batch_cond_uncond": True, "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
                        "s_min_uncond": 0.0, "skip_early_cond": 0.0, **(opts or {})}.items():
        setattr(shared.opts, name, value)
    c, uc = conds(batch, **{k: kw.pop(k) for k in ("and_rows", "cond_tokens", "uncond_tokens") if k in kw})
    runner = env["runner"]
    script_args = list(runner.default_args())
    frm = env["script"].args_from
    if args is not None:
        script_args[frm] = args
    else:
        script_args[frm] = enabled
        script_args[frm + 2] = env["face"]            # the face photo
    if kind == "txt2img":
        p = processing.StableDiffusionProcessingTxt2Img(c=c, uc=uc, batch_size=batch, seed=seed, scripts=runner,
                                                        script_args=tuple(script_args), **kw)
    else:
        latent = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
        p = processing.StableDiffusionProcessingImg2Img(c=c, uc=uc, batch_size=batch, seed=seed, scripts=runner,
                                                        script_args=tuple(script_args), init_latent=latent, **kw)
    if record is not None:
        record.p = p
    result = processing.process_images(p)
    return torch.cat(result.images), p


def check_labels(p, rec):
    """Every UNet call saw exactly the labels of the rows the CFG denoiser gave it."""
    truth = [call for sampler_calls in p._truth for call in sampler_calls]
    assert rec.seen == truth, (rec.seen, truth)


def record_truth(monkeypatch):
    """A list that receives, for every sampler created, its CFG denoiser's per-call truth."""
    from modules import sd_samplers
    created = []
    original = sd_samplers.EulerSampler.__init__

    def init(self, sd_model):
        original(self, sd_model)
        created.append(self.model_wrap_cfg.calls)

    monkeypatch.setattr(sd_samplers.EulerSampler, "__init__", init)
    return created


@pytest.fixture
def record(env, monkeypatch):
    """Collect the truth of every CFG denoiser created in the generation, and what the patch saw."""
    rec = Recorder(env["module"], env["unet"])
    rec.p = None
    rec.created = record_truth(monkeypatch)
    yield rec
    rec.close()


def labelled_run(env, record, **kw):
    out, p = run(env, record=record, **kw)
    p._truth = record.created
    check_labels(p, record)
    return out


LAYOUTS = {
    "default": {},
    "batch cond/uncond off": {"opts": {"batch_cond_uncond": False}},
    "separate cond/uncond calls": {"cond_tokens": 154},
    "separate calls, batch off": {"cond_tokens": 154, "opts": {"batch_cond_uncond": False}},
    "pad_cond_uncond": {"cond_tokens": 154, "opts": {"pad_cond_uncond": True}},
    "pad_cond_uncond_v0": {"uncond_tokens": 154, "opts": {"pad_cond_uncond_v0": True}},
    "AND prompt": {"and_rows": 2},
    "AND prompt, batch off": {"and_rows": 2, "batch": 2, "opts": {"batch_cond_uncond": False}},
    "batch of 2": {"batch": 2},
    "NGMS": {"s_min_uncond": 100.0},
    "skip early CFG": {"opts": {"skip_early_cond": 0.5}},
    "hires fix": {"enable_hr": True, "hr_scale": 1.5},
    "img2img": {"kind": "img2img"},
    "CFG 1": {"cfg_scale": 1.0},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_labels_follow_every_layout(env, record, layout):
    kw = dict(LAYOUTS[layout])
    if layout == "pad_cond_uncond":
        from modules import shared
        shared.sd_model.cond_stage_model_empty_prompt = torch.zeros(1, 77, 2048)
    labelled_run(env, record, **kw)
    assert any(any(k == 1 for k in call) for call in record.seen if call), "no uncond row was seen"
    assert any(any(k == 0 for k in call) for call in record.seen if call), "no cond row was seen"


def test_labels_in_webui_1_9_layouts(env, record):
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser
    CFGDenoiser.v19 = True
    try:
        labelled_run(env, record, s_min_uncond=100.0, opts={"batch_cond_uncond": False})
    finally:
        CFGDenoiser.v19 = False


def close(a, b):
    """Equal up to float32 rounding (relative to the latents' scale, which a random UNet inflates)."""
    return (a - b).abs().max().item() <= 2e-5 * max(a.abs().max().item(), 1.0)


@pytest.mark.parametrize("enabled", [True, False])
def test_equal_layouts_give_equal_images(env, enabled):
    base, _ = run(env, enabled=enabled)
    assert close(run(env, enabled=enabled, opts={"batch_cond_uncond": False})[0], base)
    # the same prompt twice as an AND-prompt with half weights is the prompt once
    assert close(run(env, enabled=enabled, and_rows=2)[0], base)
    # a batch of two equals two single images with the same seeds
    pair, _ = run(env, enabled=enabled, batch=2)
    second, _ = run(env, enabled=enabled, seed=8)
    assert close(pair[:1], base) and close(pair[1:], second)
    # hires batched vs unbatched
    hr_pair, _ = run(env, enabled=enabled, batch=2, enable_hr=True, hr_scale=1.5)
    hr_one, _ = run(env, enabled=enabled, enable_hr=True, hr_scale=1.5)
    assert close(hr_pair[:1], hr_one)
    # separate cond/uncond calls: batched or not, the same
    sep, _ = run(env, enabled=enabled, cond_tokens=154)
    assert close(run(env, enabled=enabled, cond_tokens=154, opts={"batch_cond_uncond": False})[0], sep)


def test_extension_changes_the_image_and_writes_infotext(env):
    on, p = run(env)
    off, _ = run(env, enabled=False)
    assert (on - off).abs().max() > 1e-3
    text = p.extra_generation_params["InstantID"]
    assert "adapter=ip-adapter.bin" in text and "identitynet=ControlNetModel" in text and "weight=0.8" in text


def test_identitynet_and_adapter_each_act(env):
    both, _ = run(env)
    again, _ = run(env)
    assert torch.equal(both, again)     # same request, same result: no state carried over
    api = {"enabled": True, "image": env["face"], "identitynet_strength": 0.0}
    adapter_only, _ = run(env, args=api)
    api = {"enabled": True, "image": env["face"], "weight": 0.0}
    cn_only, _ = run(env, args=api)
    off, _ = run(env, enabled=False)
    for img in (adapter_only, cn_only):
        assert (img - off).abs().max() > 1e-4 and (img - both).abs().max() > 1e-4


def test_keypoints_are_drawn_at_each_pass_size(env, monkeypatch):
    from lib_instantid.instantid import KpsHint
    sizes = []
    image = KpsHint.image
    monkeypatch.setattr(KpsHint, "image", lambda self, w, h: sizes.append((w, h)) or image(self, w, h))
    run(env, enable_hr=True, hr_scale=1.5)
    assert sizes == [(128, 128), (192, 192)]


def test_hires_option_switches_parts_off_in_the_second_pass(env):
    on, _ = run(env, enable_hr=True, hr_scale=1.5)
    args = {"enabled": True, "image": env["face"], "hires_adapter": False, "hires_identitynet": False}
    off_in_hr, _ = run(env, args=args, enable_hr=True, hr_scale=1.5)
    assert (on - off_in_hr).abs().max() > 1e-4


def test_no_hook_left_and_disabled_generation_is_bit_identical(env):
    unet = env["unet"]
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks_before = count_hooks(unet)
    never_used, _ = run(env, enabled=False, seed=3)
    run(env, seed=3)
    assert count_hooks(unet) == hooks_before
    after, _ = run(env, enabled=False, seed=3)
    assert torch.equal(after, never_used)
    assert all(torch.equal(v, before_state[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("failure", ["exception", "oom", "interrupt"])
def test_cleanup_after_failure_inside_a_hooked_step(env, failure):
    from modules import shared
    unet = env["unet"]
    baseline, _ = run(env, enabled=False, seed=5)
    hooks_before = count_hooks(unet)
    calls = {"n": 0}

    def fail(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            if failure == "exception":
                raise RuntimeError("boom inside the UNet")
            if failure == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            shared.state.interrupted = True

    handle = unet.middle_block.register_forward_pre_hook(fail)
    try:
        if failure == "interrupt":
            run(env, seed=5)
        else:
            with pytest.raises((RuntimeError, torch.cuda.OutOfMemoryError)):
                run(env, seed=5)
    finally:
        handle.remove()
        shared.state.interrupted = False
    assert count_hooks(unet) == hooks_before
    assert torch.equal(run(env, enabled=False, seed=5)[0], baseline)


def test_errors_reach_the_user_with_a_clear_message(env, models_path):
    from lib_instantid.errors import InstantIDError
    blank = b64(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InstantIDError, match="Adapter 'missing.bin' was not found. Available: ip-adapter.bin"):
        run(env, args={"enabled": True, "image": blank, "adapter": "missing.bin"})
    with pytest.raises(InstantIDError, match="no reference image was given"):
        run(env, args={"enabled": True})
    with pytest.raises(InstantIDError, match="Field 'weight' must be a number"):
        run(env, args={"enabled": True, "image": env["face"], "weight": "heavy"})
    with pytest.raises(InstantIDError, match="Unknown field 'wieght'"):
        run(env, args={"enabled": True, "image": env["face"], "wieght": 1.0})


def test_sd15_checkpoint_gets_a_clear_message(env, monkeypatch):
    from modules import shared
    from modules.sd_samplers import SD1Model
    from unets import sd15_like
    from lib_instantid.errors import InstantIDError
    monkeypatch.setattr(shared, "sd_model", SD1Model(sd15_like(), empty_prompt=torch.zeros(1, 77, 768)))
    with pytest.raises(InstantIDError, match="only with SDXL checkpoints"):
        _run_sd15(env)


def _run_sd15(env):
    from modules import processing
    from modules.sd_samplers_cfg_denoiser import MultiCond
    c = MultiCond([[(0, 1.0)]], torch.randn(1, 77, 768))
    runner = env["runner"]
    args = list(runner.default_args())
    args[env["script"].args_from] = {"enabled": True, "image": env["face"], "adapter": "ip-adapter.bin"}
    p = processing.StableDiffusionProcessingTxt2Img(c=c, uc=torch.randn(1, 77, 768), scripts=runner,
                                                    script_args=tuple(args))
    processing.process_images(p)
