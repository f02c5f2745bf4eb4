"""IP-Adapter and FaceID units through the real script and the webui test double.

SD1.5 (the real ldm UNet at reduced width) with IP-Adapter plus + its CLIP ViT-H encoder, FaceID with
its in-file LoRA on insightface's buffalo_l pack, and on SDXL InstantID together with an IP-Adapter
unit. Checks: the units act, the encoder runs once per reference image, the LoRA hooks exist only
during sampling, clear messages for a missing or wrong encoder and a wrong model family, and the
row labels in the layouts that matter.
"""

import pytest
import torch

from lib_instantid.hooks import count_hooks
from lib_instantid.model_cache import CACHE

from test_generation import Recorder, b64, record_truth, script_env

gr = pytest.importorskip("gradio")
pytest.importorskip("insightface")


@pytest.fixture(scope="module")
def sd15(webui, script_module, sd15_unet, astronaut):
    return script_env(script_module, sd15_unet, astronaut)


def generate(env, unit_args, *, model="sd15", seed=4, batch_off=False, cond_tokens=77, args=None):
    from modules import processing, shared
    from modules.sd_samplers import SD1Model, SDXLModel
    from modules.sd_samplers_cfg_denoiser import DictWithShape, MultiCond

    shared.opts.batch_cond_uncond = not batch_off
    g = torch.Generator().manual_seed(0)
    if model == "sd15":
        shared.sd_model = SD1Model(env["unet"], empty_prompt=torch.zeros(1, 77, 768))
        c = MultiCond([[(0, 1.0)]], torch.randn(1, cond_tokens, 768, generator=g))
        uc = torch.randn(1, 77, 768, generator=g)
    else:
        shared.sd_model = SDXLModel(env["unet"], empty_prompt=torch.zeros(1, 77, 2048))
        c = MultiCond([[(0, 1.0)]], DictWithShape(crossattn=torch.randn(1, cond_tokens, 2048, generator=g),
                                                  vector=torch.randn(1, 2816, generator=g)))
        uc = DictWithShape(crossattn=torch.randn(1, 77, 2048, generator=g), vector=torch.randn(1, 2816, generator=g))
    runner = env["runner"]
    script_args = list(runner.default_args())
    script_args[env["script"].args_from] = args if args is not None else {"enabled": True, **unit_args}
    p = processing.StableDiffusionProcessingTxt2Img(c=c, uc=uc, seed=seed, scripts=runner, script_args=tuple(script_args))
    env["last_p"] = p
    try:
        out = torch.cat(processing.process_images(p).images)
    finally:
        shared.opts.batch_cond_uncond = True
    return out, p


def test_ip_adapter_plus_acts_and_encodes_each_reference_once(sd15):
    off, _ = generate(sd15, {}, args={"enabled": False})
    on, p = generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors", "weight": 1.0})
    assert (on - off).abs().max() > 1e-3
    text = p.extra_generation_params["InstantID"]
    assert "variant=plus" in text and "encoder=CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in text
    computed = CACHE.computed
    again, _ = generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors", "weight": 1.0})
    assert CACHE.computed == computed          # no encoder run: the reference and the zero image are cached
    assert torch.equal(again, on)
    styled, _ = generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors", "weight": 1.0,
                                "weight_type": "style transfer"})
    assert (styled - on).abs().max() > 1e-4


def test_negative_image_and_mask_change_the_result(sd15, astronaut):
    base = {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors", "weight": 1.0}
    plain, _ = generate(sd15, base)
    negative, _ = generate(sd15, dict(base, negative_image=b64(astronaut[::-1].copy())))
    mask = astronaut.copy()
    mask[:, :256] = 0
    mask[:, 256:] = 255
    masked, _ = generate(sd15, dict(base, mask=b64(mask)))
    assert (negative - plain).abs().max() > 1e-4 and (masked - plain).abs().max() > 1e-4


def test_faceid_applies_its_lora_only_during_sampling(sd15):
    unet = sd15["unet"]
    hooks_before = count_hooks(unet)
    seen = []
    handle = unet.middle_block.register_forward_pre_hook(lambda m, a: seen.append(count_hooks(unet)))
    try:
        with_lora, p = generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-faceid_sd15.bin"})
        without, _ = generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-faceid_sd15.bin",
                                     "lora_strength": 0.0})
    finally:
        handle.remove()
    assert "variant=faceid" in p.extra_generation_params["InstantID"]
    assert "lora_strength=1.0" in p.extra_generation_params["InstantID"]
    # 32 attention processors x 4 projections of LoRA + 2 IP hooks per cross-attention layer + labelling
    assert max(seen) - hooks_before - 1 >= 16 * 8 + 16 * 2
    assert count_hooks(unet) == hooks_before
    assert (with_lora - without).abs().max() > 1e-4


def test_encoder_messages(sd15, models_path, tmp_path):
    from lib_instantid.errors import InstantIDError
    with pytest.raises(InstantIDError, match="Image encoder 'clip_g.pth' was not found"):
        generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors", "encoder": "clip_g.pth"})
    folder = models_path / "clip_vision"
    hidden = tmp_path / "moved"
    folder.rename(hidden)
    try:
        with pytest.raises(InstantIDError, match=r"needs the CLIP ViT-H-14 image encoder .*models/clip_vision"):
            generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-plus_sd15.safetensors"})
    finally:
        hidden.rename(folder)


def test_wrong_family_is_a_sentence(sd15):
    from lib_instantid.errors import InstantIDError
    with pytest.raises(InstantIDError, match="'ip-adapter_sdxl_vit-h.safetensors' is an adapter for SDXL, but the "
                                             "loaded checkpoint is SD 1.5"):
        generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter_sdxl_vit-h.safetensors"})


@pytest.mark.parametrize("batch_off,cond_tokens", [(False, 77), (True, 77), (False, 154)])
def test_labels_with_an_ip_adapter_unit(sd15, script_module, monkeypatch, batch_off, cond_tokens):
    truth = record_truth(monkeypatch)
    rec = Recorder(script_module, sd15["unet"])
    try:
        rec.p = None
        from modules import processing
        original = processing.process_images

        def track(p):
            rec.p = p
            return original(p)
        monkeypatch.setattr(processing, "process_images", track)
        generate(sd15, {"image": sd15["face"], "adapter": "ip-adapter-faceid_sd15.bin"}, batch_off=batch_off,
                 cond_tokens=cond_tokens)
    finally:
        rec.close()
    assert rec.seen == [c for calls in truth for c in calls]


def test_instantid_and_an_ip_adapter_together_on_sdxl(env_sdxl):
    env = env_sdxl
    instantid = {"image": env["face"], "adapter": "ip-adapter.bin"}
    style = {"image": env["face"], "adapter": "ip-adapter_sdxl_vit-h.safetensors", "weight": 0.6}
    both, p = generate(env, {}, model="sdxl", args={"enabled": True, "units": [instantid, style]})
    only_instantid, _ = generate(env, {}, model="sdxl", args={"enabled": True, "units": [instantid]})
    assert (both - only_instantid).abs().max() > 1e-4
    assert {"InstantID unit 1", "InstantID unit 2"} <= set(p.extra_generation_params)
    assert "variant=base" in p.extra_generation_params["InstantID unit 2"]


@pytest.fixture(scope="module")
def env_sdxl(webui, script_module, sdxl_unet, astronaut):
    return script_env(script_module, sdxl_unet, astronaut)
