"""lib_instantid.projection: every published adapter layout builds, and the outputs match diffusers.

Full-size shape checks run on the meta device for all 31 IP-Adapter / FaceID / InstantID manifests.
Numerical parity runs on CPU at the real image_proj sizes against diffusers' own projection modules
(diffusers is only a test oracle). To stay fast on two cores, the SDXL FaceID-plusv2 perceiver
(~200 M parameters), the SDXL portrait MLP and the SDXL plus / plus-face Resampler are checked on meta
only: InstantID runs the same 1280-wide, 20-head Resampler numerically (proj_in 512 instead of 1280 wide,
which SD1.5 plus covers).
"""

import functools
import types

import pytest
import torch

from lib_instantid.errors import ModelFileError
from lib_instantid.projection import PerceiverAttention, ProjInfo, build_image_proj

from model_factory import (
    adapter_manifest_names,
    adapter_parts,
    load_manifest,
    only_image_proj,
    reduced_ip_adapter_shapes,
    state_dict_from_manifest,
    write_model_file,
)

ADAPTERS = adapter_manifest_names()

KIND_BY_FAMILY = {
    "standard": "image_proj", "light": "image_proj", "standard-vitG": "image_proj",
    "plus": "resampler", "plus-face": "resampler", "instantid": "resampler",
    "faceid-portrait-unnorm": "resampler", "full-face": "mlp_full",
    "faceid": "faceid", "faceid-portrait": "faceid",
    "faceid-plus": "faceid_plus", "faceid-plusv2": "faceid_plus",
}

ATOL = 2e-5  # fp32; measured <= ~1e-6 for every variant


def _meta_inputs(info: ProjInfo, batch: int = 2):
    d = dict(device="meta")
    if info.kind == "image_proj":
        return (torch.empty(batch, info.input_dim, **d),)
    if info.kind in ("resampler", "mlp_full") and info.input_kind == "clip_hidden":
        return (torch.empty(batch, 257, info.input_dim, **d),)
    if info.kind == "resampler":
        return (torch.empty(batch, 1, info.input_dim, **d),)
    if info.kind == "faceid":
        return (torch.empty(batch, info.input_dim, **d),)
    return (torch.empty(batch, info.input_dim, **d), torch.empty(batch, 257, info.clip_hidden_dim, **d))


def test_adapter_manifests_found():
    assert len(ADAPTERS) == 31


@pytest.mark.parametrize("name", ADAPTERS)
def test_full_size_build_on_meta(name):
    m = load_manifest(name)
    image_proj, ip = adapter_parts(state_dict_from_manifest(m, device="meta"))
    cross_dim = ip["1.to_k_ip.weight"].shape[1]
    module, info = build_image_proj(image_proj, cross_dim)
    assert info.kind == KIND_BY_FAMILY[m["family"]]
    assert info.num_tokens == m["num_image_tokens"]
    assert info.output_dim == cross_dim
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == sum(t.numel() for t in image_proj.values())
    out = module(*_meta_inputs(info))
    assert tuple(out.shape) == (2, info.num_tokens, cross_dim)


# ----------------------------------------------------------------------------------------------
# Numerical parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    """image_proj dict -> diffusers MultiIPAdapterImageProjection (what the UNet calls)."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    dummy_unet = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)

    def make(image_proj):
        proj = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
            dummy_unet, dict(image_proj), low_cpu_mem_usage=False
        )
        return MultiIPAdapterImageProjection([proj]).eval()

    return make


@functools.lru_cache(maxsize=None)
def _cpu_image_proj(name):
    sd = state_dict_from_manifest(name, shape_override=only_image_proj, seed=1)
    image_proj, _ = adapter_parts(sd)
    return {k: v.float() for k, v in image_proj.items()}  # shared by tests; nothing writes to it


def _ours(image_proj, cross_dim):
    return build_image_proj(image_proj, cross_dim)


def _close(ours, theirs, label):
    assert ours.shape == theirs.shape, label
    diff = (ours - theirs).abs().max().item()
    print(f"parity {label}: max |diff| = {diff:.2e} (|ref| max {theirs.abs().max().item():.2f})")
    assert diff <= ATOL, f"{label}: {diff}"


_gen = torch.Generator().manual_seed(0)
CLIP_EMBEDS = torch.randn(2, 1024, generator=_gen)
CLIP_EMBEDS_G = torch.randn(2, 1280, generator=_gen)
CLIP_HIDDEN = torch.randn(2, 257, 1280, generator=_gen)
FACE = torch.randn(2, 512, generator=_gen)  # ~ norm 22, like an unnormalised ArcFace embedding
FACES = torch.randn(2, 2, 512, generator=_gen)


@torch.no_grad()
@pytest.mark.parametrize("name,cross_dim,x", [
    ("ip-adapter_sd15.bin", 768, CLIP_EMBEDS),
    ("ip-adapter_sdxl.safetensors", 2048, CLIP_EMBEDS_G),
])
def test_parity_image_proj(oracle, name, cross_dim, x):
    p = _cpu_image_proj(name)
    ours, _ = _ours(p, cross_dim)
    _close(ours(x), oracle(p)([x[:, None]])[0][:, 0], name)


@torch.no_grad()
@pytest.mark.parametrize("name,cross_dim", [
    ("ip-adapter-plus_sd15.bin", 768),
    ("ip-adapter-full-face_sd15.safetensors", 768),
])
def test_parity_clip_hidden(oracle, name, cross_dim):
    p = _cpu_image_proj(name)
    ours, _ = _ours(p, cross_dim)
    _close(ours(CLIP_HIDDEN), oracle(p)([CLIP_HIDDEN[:, None]])[0][:, 0], name)


@torch.no_grad()
def test_parity_instantid_resampler(oracle):
    p = _cpu_image_proj("instantid_ip-adapter.bin")
    ours, info = _ours(p, 2048)
    assert info.input_kind == "face_embedding"
    theirs = oracle(p)([FACE[:, None, None, :]])[0][:, 0]  # diffusers needs [B,1,1,512]
    _close(ours(FACE[:, None]), theirs, "instantid")
    _close(ours(FACE), theirs, "instantid (2-D input)")


@torch.no_grad()
@pytest.mark.parametrize("name,cross_dim", [
    ("ip-adapter-faceid_sd15.bin", 768),
    ("ip-adapter-faceid_sdxl.bin", 2048),
])
def test_parity_faceid(oracle, name, cross_dim):
    p = _cpu_image_proj(name)
    ours, _ = _ours(p, cross_dim)
    _close(ours(FACE), oracle(p)([FACE[:, None]])[0][:, 0], name)


@torch.no_grad()
def test_parity_portrait_one_and_two_faces(oracle):
    p = _cpu_image_proj("ip-adapter-faceid-portrait_sd15.bin")
    ours, info = _ours(p, 768)
    theirs = oracle(p)
    _close(ours(FACE), theirs([FACE[:, None]])[0][:, 0], "portrait 1 face")
    two = theirs([FACES])[0]  # [B, n_faces, 16, C]; the UNet concatenates the faces' tokens
    out = ours(FACES)
    assert out.shape == (2, 2 * info.num_tokens, 768)
    _close(out, two.reshape(2, -1, 768), "portrait 2 faces")


@torch.no_grad()
@pytest.mark.parametrize("name,shortcut,scale", [
    ("ip-adapter-faceid-plus_sd15.bin", False, 1.0),
    ("ip-adapter-faceid-plusv2_sd15.bin", True, 1.0),
    ("ip-adapter-faceid-plusv2_sd15.bin", True, 0.5),
])
def test_parity_faceid_plus(oracle, name, shortcut, scale):
    p = _cpu_image_proj(name)
    ours, _ = _ours(p, 768)
    theirs = oracle(p)
    layer = theirs.image_projection_layers[0]
    layer.clip_embeds = CLIP_HIDDEN[:, None]  # diffusers reads these from an attribute
    layer.shortcut, layer.shortcut_scale = shortcut, scale
    _close(ours(FACE, CLIP_HIDDEN, shortcut=shortcut, scale=scale),
           theirs([FACE[:, None]])[0][:, 0], f"{name} shortcut={shortcut} scale={scale}")


@torch.no_grad()
def test_perceiver_attention_follows_the_published_formula():
    """Independent of diffusers: softmax((q*s)(k*s)^T) v with s = dim_head**-0.25, per head."""
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=128, heads=2).eval()
    x, lat = torch.randn(2, 5, 128), torch.randn(2, 3, 128)
    xn, ln = attn.norm1(x), attn.norm2(lat)
    q = attn.to_q(ln)
    k, v = attn.to_kv(torch.cat([xn, ln], dim=1)).chunk(2, dim=-1)
    heads = lambda t: t.reshape(2, t.shape[1], 2, 64).transpose(1, 2)  # noqa: E731
    s = 64 ** -0.25
    w = ((heads(q) * s) @ (heads(k) * s).transpose(-2, -1)).float().softmax(dim=-1)
    ref = attn.to_out((w @ heads(v)).transpose(1, 2).reshape(2, 3, 128))
    assert (attn(x, lat) - ref).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# dtypes, devices, broken files
# ----------------------------------------------------------------------------------------------


def test_mixed_dtypes_are_cast():
    p = dict(adapter_parts(state_dict_from_manifest("ip-adapter_sd15.bin"))[0])
    p["norm.weight"] = p["norm.weight"].float()  # fp16 + fp32 in one dict
    module, _ = build_image_proj(p, 768)
    assert {q.dtype for q in module.parameters()} == {torch.float32}
    module16, _ = build_image_proj(p, 768, dtype=torch.float16)
    assert {q.dtype for q in module16.parameters()} == {torch.float16}
    assert not any(q.requires_grad for q in module.parameters()) and not module.training


def _meta_proj(name):
    return dict(adapter_parts(state_dict_from_manifest(name, device="meta"))[0])


def test_missing_tensor_is_a_model_file_error():
    p = _meta_proj("ip-adapter-plus_sd15.bin")
    del p["layers.2.1.3.weight"]
    with pytest.raises(ModelFileError, match=r"layers\.2\.1\.3\.weight"):
        build_image_proj(p, 768)
    p = _meta_proj("ip-adapter-plus_sd15.bin")
    del p["layers.0.0.to_q.weight"]
    with pytest.raises(ModelFileError, match=r"no 'layers\.0\.0\.to_q\.weight'"):
        build_image_proj(p, 768)


def test_wrong_shape_is_a_model_file_error():
    p = _meta_proj("ip-adapter-plus_sd15.bin")
    p["layers.1.0.to_kv.weight"] = torch.empty(1500, 768, device="meta")
    with pytest.raises(ModelFileError, match="size mismatch"):
        build_image_proj(p, 768)
    p = _meta_proj("ip-adapter_sd15.bin")
    p["proj.weight"] = torch.empty(3000, 1024, device="meta")
    with pytest.raises(ModelFileError, match="whole number"):
        build_image_proj(p, 768)


def test_wrong_base_model_is_a_model_file_error():
    with pytest.raises(ModelFileError, match="^ip-adapter_sdxl.bin: .*2048-wide tokens.*768"):
        build_image_proj(_meta_proj("ip-adapter_sdxl.bin"), 768, file_name="ip-adapter_sdxl.bin")


def test_unknown_layout_names_its_top_keys():
    pulid = _meta_proj("ip-adapter_pulid_sdxl_fp16.safetensors")
    with pytest.raises(ModelFileError, match="body.*mapping_0"):
        build_image_proj(pulid, 2048)
    with pytest.raises(ModelFileError, match="not a tensor"):
        build_image_proj({"proj.weight": [1, 2]}, 768)
    with pytest.raises(ModelFileError):
        build_image_proj({}, 768)


# ----------------------------------------------------------------------------------------------
# The factory itself
# ----------------------------------------------------------------------------------------------


def _flat(sd):
    return {f"{o}.{k}": v for o, d in sd.items() for k, v in d.items()} if "image_proj" in sd else sd


def test_factory_files_match_their_manifests(tmp_path):
    from safetensors.torch import load_file

    for name, shrink in (("ip-adapter_sd15.bin", None),
                         ("ip-adapter_sd15.safetensors", reduced_ip_adapter_shapes(dict.fromkeys(range(32), 8)))):
        m = load_manifest(name)
        path = write_model_file(m, tmp_path / m["file"], shape_override=shrink)
        if m["container"] == "torch-pickle-nested":
            sd = torch.load(path, weights_only=True)
            assert list(sd) == m["top_level"]["keys"] and all(type(d) is dict for d in sd.values())
        else:
            sd = load_file(path)
        sd, expected = _flat(sd), _flat(state_dict_from_manifest(m, device="meta", shape_override=shrink))
        assert set(sd) == set(expected)
        for k, v in sd.items():
            assert v.shape == expected[k].shape and v.dtype == expected[k].dtype == torch.float16, k
            assert torch.isfinite(v.float()).all() and v.float().abs().max() < 2, k


def test_reduced_ip_adapter_shapes():
    shrink = reduced_ip_adapter_shapes({0: 32, 1: 32, 3: 64})
    sd = state_dict_from_manifest("ip-adapter-faceid_sd15.bin", shape_override=shrink)
    ip = sd["ip_adapter"]
    assert ip["1.to_k_ip.weight"].shape == (32, 768) and ip["3.to_v_ip.weight"].shape == (64, 768)
    assert ip["0.to_k_lora.down.weight"].shape == (128, 32)  # attn1: input is the inner dim
    assert ip["1.to_k_lora.down.weight"].shape == (128, 768)  # attn2: input is the context
    assert ip["1.to_out_lora.up.weight"].shape == (32, 128)
    assert "5.to_k_ip.weight" not in ip and sd["image_proj"]["proj.2.weight"].shape == (3072, 1024)


def test_unit_tokens_average_and_concat():
    """Several references: 'average' projects the mean input, 'concat' each one's tokens in turn."""
    from types import SimpleNamespace
    from lib_instantid.model_files import Detected
    from lib_instantid.projection import ImageProjModel
    from lib_instantid.tokens import References, unit_tokens

    torch.manual_seed(0)
    proj = ImageProjModel(clip_dim=32, output_dim=16, num_tokens=4).eval()
    adapter = SimpleNamespace(name="a", proj=proj, info=SimpleNamespace(kind="image_proj"),
                              detected=Detected("adapter", "base", "sd15", 4, "clip_embeds", 32))
    x = torch.randn(2, 32)
    with torch.no_grad():
        one, two, zero = proj(x[:1]), proj(x[1:]), proj(torch.zeros(1, 32))
        mean = proj(x.mean(0, keepdim=True))
    avg = unit_tokens(adapter, References(clip_embeds=x), combine="average")
    assert torch.allclose(avg, torch.cat([mean, zero]), atol=1e-6)
    cat = unit_tokens(adapter, References(clip_embeds=x), combine="concat")
    assert cat.shape == (2, 8, 16)
    assert torch.allclose(cat[0], torch.cat([one[0], two[0]]), atol=1e-6)
    assert torch.allclose(cat[1], torch.cat([zero[0], zero[0]]), atol=1e-6)
    neg = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.allclose(unit_tokens(adapter, References(clip_embeds=x, uncond_clip_embeds=neg))[1], proj(neg)[0],
                              atol=1e-6)
