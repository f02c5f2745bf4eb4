"""Every IP-Adapter / FaceID variant against diffusers' own implementation, on the same weights.

For each published layout (manifest): a random-weight file (image projection at its real size,
ip_adapter tensors shrunk to a reduced UNet) is written, loaded by our loader, detected, projected by
``tokens.unit_tokens`` and run through the patched webui UNet (the real ldm class); diffusers loads
the same dict into a UNet2DConditionModel twin and computes tokens and output with per-row image
embeddings (cond rows: the references, uncond rows: the empty input). FaceID's LoRA is compared in
tests/test_lora.py; here the attention and projection parts are.
"""

import pytest
import torch

from lib_instantid.adapters import load_adapter
from lib_instantid.ip_attention import AttentionUnit
from lib_instantid.session import GenerationPatch, Schedule
from lib_instantid.tokens import References, unit_tokens

from lib_instantid.weights import load_file, split_adapter

from model_factory import load_manifest, reduced_ip_adapter_shapes, unet_attention_layers, write_model_file
from unets import CallsUNet, diffusers_twin, sd15_like, sdxl_inputs, sdxl_like

diffusers = pytest.importorskip("diffusers")

VARIANTS = {   # manifest -> (expected variant, diffusers input kind)
    "ip-adapter_sd15.safetensors": ("base", "embeds"),
    "ip-adapter_sd15_light.bin": ("light", "embeds"),
    "ip-adapter_sd15_vit-G.bin": ("base", "embeds"),
    "ip-adapter-plus_sd15.bin": ("plus", "hidden"),
    "ip-adapter-plus-face_sd15.safetensors": ("plus_face", "hidden"),
    "ip-adapter-full-face_sd15.bin": ("full_face", "hidden"),
    "ip-adapter-faceid_sd15.bin": ("faceid", "face"),
    "ip-adapter-faceid-portrait_sd15.bin": ("faceid_portrait", "face"),
    "ip-adapter-faceid-portrait-v11_sd15.bin": ("faceid_portrait", "face"),
    "ip-adapter-faceid-plus_sd15.bin": ("faceid_plus", "face+hidden"),
    "ip-adapter-faceid-plusv2_sd15.bin": ("faceid_plusv2", "face+hidden"),
    "ip-adapter_sdxl.bin": ("base", "embeds"),
    "ip-adapter_sdxl_vit-h.safetensors": ("base", "embeds"),
    "ip-adapter-plus_sdxl_vit-h.safetensors": ("plus", "hidden"),
    "ip-adapter-plus-face_sdxl_vit-h.bin": ("plus_face", "hidden"),
    "ip-adapter-faceid_sdxl.bin": ("faceid", "face"),
    "ip-adapter-faceid-portrait_sdxl.bin": ("faceid_portrait", "face"),
}
SCALE = 0.7


@pytest.fixture(scope="module")
def unets():
    out = {}
    for kind, build in (("sd15", sd15_like), ("sdxl", sdxl_like)):
        ldm = build()
        out[kind] = (ldm, diffusers_twin(ldm, kind))
    return out


def _inputs(needs, proj_in, n, g):
    if needs == "embeds":
        return References(clip_embeds=torch.randn(n, proj_in, generator=g))
    hidden = torch.randn(n, 257, 1280, generator=g)
    uncond_hidden = torch.randn(1, 257, 1280, generator=g)
    if needs == "hidden":
        return References(clip_hidden=hidden, uncond_clip_hidden=uncond_hidden)
    faces = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1)
    return References(faces=faces, clip_hidden=hidden, uncond_clip_hidden=uncond_hidden)


def _diffusers_rows(refs, needs, n, combine_concat):
    """image_embeds for diffusers: row 0 = cond (the references), row 1 = uncond."""
    if needs == "embeds":
        x = refs.clip_embeds.mean(0, keepdim=True)
        return torch.cat([x, torch.zeros_like(x)])[:, None], None
    if needs == "hidden":
        x = refs.clip_hidden.mean(0, keepdim=True)
        return torch.cat([x, refs.uncond_clip_hidden])[:, None], None
    if needs == "face":
        if combine_concat:
            return torch.stack([refs.faces, torch.zeros_like(refs.faces)]), None   # [2, n, 512]
        x = refs.faces.mean(0, keepdim=True)
        return torch.cat([x, torch.zeros_like(x)])[:, None], None
    x = refs.faces.mean(0, keepdim=True)
    clip = torch.cat([refs.clip_hidden.mean(0, keepdim=True), refs.uncond_clip_hidden])[:, None]
    return torch.cat([x, torch.zeros_like(x)])[:, None], clip


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_diffusers(name, unets, tmp_path):
    variant, needs = VARIANTS[name]
    manifest = load_manifest(name)
    base = manifest["base_model"]
    ldm, twin = unets[base]
    dims = dict(enumerate(d for _, d in unet_attention_layers(twin)))
    shrink = reduced_ip_adapter_shapes(dims)
    path = tmp_path / name
    write_model_file(manifest, path, shape_override=shrink, seed=3)
    adapter = load_adapter(str(path))
    assert adapter.detected.variant == variant and adapter.detected.base == base

    n = 2
    portrait = variant == "faceid_portrait"
    g = torch.Generator().manual_seed(8)
    proj_in = adapter.detected.input_dim
    refs = _inputs(needs, proj_in, n, g)
    shortcut = variant == "faceid_plusv2"
    tokens = unit_tokens(adapter, refs, combine="concat" if portrait else "average", s_scale=0.6)

    image_proj, ip = split_adapter(load_file(str(path)))
    twin._load_ip_adapter_weights({"image_proj": {k: v.float() for k, v in image_proj.items()},
                                   "ip_adapter": {k: v.float() for k, v in ip.items() if "_lora" not in k}},
                                  low_cpu_mem_usage=False)
    for proc in twin.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [SCALE]
    embeds, clip = _diffusers_rows(refs, needs, n, portrait)
    proj = twin.encoder_hid_proj.image_projection_layers[0]
    if clip is not None:
        proj.clip_embeds, proj.shortcut, proj.shortcut_scale = clip, shortcut, 0.6
    with torch.no_grad():
        ref_tokens = twin.encoder_hid_proj([embeds])[0]
    ref_tokens = ref_tokens.reshape(2, -1, ref_tokens.shape[-1])
    token_diff = (tokens - ref_tokens).abs().max().item()
    assert tokens.shape == ref_tokens.shape
    assert token_diff < 2e-5, token_diff

    # the UNet with the adapter, rows [cond, uncond]
    if base == "sdxl":
        x, t, ctx, y, add = sdxl_inputs(2, seed=5)
        kwargs = {"added_cond_kwargs": {**add, "image_embeds": [embeds]}}
    else:
        g2 = torch.Generator().manual_seed(5)
        x, t, ctx, y = torch.randn(2, 4, 16, 16, generator=g2), torch.full((2,), 400.0), \
            torch.randn(2, 77, 768, generator=g2), None
        kwargs = {"added_cond_kwargs": {"image_embeds": [embeds]}}
    with torch.no_grad():
        expected = twin(x, t, ctx, **kwargs).sample
        model = CallsUNet(ldm)
        with GenerationPatch(ldm, [(AttentionUnit(name, tokens, adapter.ip), Schedule(SCALE))]) as patch:
            patch.begin_step(x, 1, 0, 10, model)
            got = model(x, t, context=ctx, y=y)
        _unload(twin)
    diff = (got - expected).abs().max().item()
    print(f"{name}: tokens {tuple(tokens.shape)} max diff {token_diff:.1e}; UNet max diff {diff:.1e}")
    assert diff < 1e-4, diff


def _unload(twin):
    """Back to a plain diffusers UNet (plain attention processors, no image projection)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    twin.set_attn_processor(AttnProcessor2_0())
    twin.encoder_hid_proj = None
    twin.config.encoder_hid_dim_type = None
