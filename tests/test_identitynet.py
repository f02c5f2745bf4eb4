"""IdentityNet (InstantID's ControlNet): layout vs the published file, numerics vs diffusers."""

import json
import math
import os

import pytest
import torch

from lib_instantid.errors import ModelFileError
from lib_instantid.identitynet import (
    INSTANTID_CONFIG,
    IdentityNet,
    infer_config,
    is_identitynet_state_dict,
    residual_targets,
    timestep_embedding,
)

MANIFESTS = os.path.join(os.path.dirname(__file__), "..", "lib_instantid", "manifests")


def _load(name):
    with open(os.path.join(MANIFESTS, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real_config():
    return _load("instantid_controlnet_config.json")


@pytest.fixture(scope="module")
def manifest_shapes():
    tensors = _load("instantid_controlnet_diffusion_pytorch_model.safetensors.json")["tensors"]
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def _reduced(config):
    cfg = dict(config)
    cfg.update(
        block_out_channels=[64, 128, 256],
        attention_head_dim=[1, 2, 4],
        transformer_layers_per_block=[1, 2, 2],
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# full size, meta device
# ---------------------------------------------------------------------------------------------


def test_full_size_matches_manifest(real_config, manifest_shapes):
    with torch.device("meta"):
        net = IdentityNet(real_config)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(shapes) == 844 == len(manifest_shapes)
    assert set(shapes) == set(manifest_shapes)
    bad = [k for k in shapes if shapes[k] != manifest_shapes[k]]
    assert not bad, bad[:5]
    assert sum(p.numel() for p in net.parameters()) == 1251014160


def test_embedded_config_and_inferred_config(real_config, manifest_shapes):
    for k, v in INSTANTID_CONFIG.items():
        assert real_config[k] == v, k
    inferred = infer_config(manifest_shapes)
    for k, v in inferred.items():
        assert real_config[k] == v, k
    assert is_identitynet_state_dict(manifest_shapes)
    assert not is_identitynet_state_dict(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"])


def test_from_state_dict_full_size_meta(real_config, manifest_shapes):
    sd = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in manifest_shapes.items()}
    net = IdentityNet.from_state_dict(sd)  # config inferred
    assert net.conv_in.weight.dtype == torch.float16
    assert not any(p.requires_grad for p in net.parameters())


def test_residual_targets(real_config):
    targets = residual_targets(real_config)
    assert [t.ldm_block for t in targets] == [f"input_blocks.{i}" for i in range(9)]
    assert [t.channels for t in targets] == [320, 320, 320, 320, 640, 640, 640, 1280, 1280]
    assert [t.downscale for t in targets] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert targets[3].diffusers_source == "down_blocks.0.downsamplers.0"
    assert targets[4].diffusers_source == "down_blocks.1.attentions.0"
    sd15 = dict(
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        attention_head_dim=8,
        cross_attention_dim=768,
    )
    assert len(residual_targets(sd15)) == 12


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_rejects_unsupported_config(real_config):
    for change in (
        {"class_embed_type": "timestep"},
        {"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
        {"attention_head_dim": [5, 10]},
        {"resnet_time_scale_shift": "scale_shift"},
    ):
        with pytest.raises(ModelFileError):
            IdentityNet({**real_config, **change})


def test_wrong_state_dict_is_readable(real_config, manifest_shapes):
    sd = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in manifest_shapes.items()}
    del sd["mid_block.resnets.1.conv2.bias"]
    sd["down_blocks.1.attentions.0.proj_in.weight"] = torch.empty(640, 640, 1, 1, device="meta")
    sd["extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ModelFileError) as err:
        IdentityNet.from_state_dict(sd, real_config)
    msg = str(err.value)
    assert "1 missing key(s)" in msg and "mid_block.resnets.1.conv2.bias" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "wrong shape" in msg and "down_blocks.1.attentions.0.proj_in.weight" in msg
    assert "Traceback" not in msg and len(msg) < 1000

    with pytest.raises(ModelFileError, match="not a diffusers-format ControlNet"):
        IdentityNet.from_state_dict({"conv_in.weight": torch.zeros(1)}, real_config)


# ---------------------------------------------------------------------------------------------
# numerics vs diffusers (reduced width, CPU)
# ---------------------------------------------------------------------------------------------


def _randomize(module, gen):
    """Replace constant init (zero convs, norm ones/zeros) so every tensor's name matters."""
    with torch.no_grad():
        for p in module.parameters():
            if torch.all(p == 0) or torch.all(p == 1):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))


def _inputs(gen, b=2):
    x = torch.randn(b, 4, 16, 16, generator=gen)
    t = torch.tensor([999.0, 37.0])[:b]
    ctx = torch.randn(b, 16, 2048, generator=gen)
    hint = torch.rand(b, 3, 128, 128, generator=gen)
    text_embeds = torch.randn(b, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [832.0, 1216.0, 16.0, 8.0, 896.0, 1152.0]])[:b]
    y = torch.cat([text_embeds, timestep_embedding(time_ids.reshape(-1), 256).reshape(b, -1)], dim=1)
    return x, t, ctx, hint, text_embeds, time_ids, y


@pytest.fixture(scope="module")
def reduced_pair(real_config):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = _reduced(real_config)
    ref = diffusers.ControlNetModel.from_config(cfg).eval()
    _randomize(ref, gen)
    net = IdentityNet(cfg).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, net


def test_timestep_embedding_matches_ldm_formula():
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    emb = timestep_embedding(t, 8)
    half = 4
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    assert torch.allclose(emb, torch.cat([torch.cos(args), torch.sin(args)], -1), atol=1e-6)


def test_parity_with_diffusers(reduced_pair):
    cfg, ref, net = reduced_pair
    gen = torch.Generator().manual_seed(2)
    x, t, ctx, hint, te, tid, y = _inputs(gen)
    scale = 0.8
    with torch.no_grad():
        out = ref(
            x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=scale,
            added_cond_kwargs={"text_embeds": te, "time_ids": tid}, return_dict=True,
        )
        downs, mid = net(x, t, ctx, y, hint, scale=scale)
    assert len(downs) == len(out.down_block_res_samples) == 9
    diffs = [(a - b).abs().max().item() for a, b in zip(downs, out.down_block_res_samples)]
    diffs.append((mid - out.mid_block_res_sample).abs().max().item())
    mags = [r.abs().max().item() for r in list(out.down_block_res_samples) + [out.mid_block_res_sample]]
    print(f"\nIdentityNet vs diffusers max abs diff {max(diffs):.3e} (max |residual| {max(mags):.3e})")
    assert min(mags) > 1e-3  # residuals are not trivially zero
    for d, m in zip(diffs, mags):
        assert d <= 1e-5 * max(1.0, m), (diffs, mags)
    for r, target in zip(downs, residual_targets(cfg)):
        assert r.shape[1] == target.channels and r.shape[-1] == 16 // target.downscale


def test_broadcast_and_timestep_forms(reduced_pair):
    _, _, net = reduced_pair
    gen = torch.Generator().manual_seed(3)
    x, t, ctx, hint, _, _, y = _inputs(gen)
    with torch.no_grad():
        d_ref, m_ref = net(x, torch.tensor([500, 500]), ctx, y, hint[:1].expand(2, -1, -1, -1), scale=0.5)
        d_a, m_a = net(x, 500, ctx, y, hint[:1], scale=0.5)  # int scalar t, batch-1 hint
        d_b, m_b = net(x, torch.tensor([500.0]), ctx, y, hint[:1], scale=torch.tensor([0.5, 0.0]))
    assert torch.equal(m_ref, m_a) and all(torch.equal(a, b) for a, b in zip(d_ref, d_a))
    assert torch.allclose(m_b[0], m_ref[0]) and torch.all(m_b[1] == 0)
    with pytest.raises(ValueError):
        net(x, t, ctx, y, hint[..., :64, :64])


def test_load_into_low_precision_and_run(reduced_pair):
    cfg, ref, net = reduced_pair
    gen = torch.Generator().manual_seed(4)
    x, t, ctx, hint, _, _, y = _inputs(gen, b=1)
    x, hint = x[..., :8, :8], hint[..., :64, :64]  # small: half precision is slow on CPU
    with torch.no_grad():
        d32, m32 = net(x, t, ctx, y, hint)
    sd16 = {k: v.to(torch.float16) for k, v in ref.state_dict().items()}
    ran = []
    for dtype in (torch.bfloat16, torch.float16):
        low = IdentityNet.from_state_dict(sd16, cfg, dtype=dtype)
        assert all(p.dtype == dtype for p in low.parameters())
        try:
            with torch.no_grad():
                d, m = low(x, t, ctx, y, hint)  # fp32 inputs, cast inside
        except RuntimeError as exc:  # some CPU builds lack half kernels
            if "not implemented" in str(exc).lower():
                continue
            raise
        assert m.dtype == dtype and all(r.dtype == dtype for r in d)
        rel = (m.float() - m32).abs().max() / m32.abs().max()
        assert torch.isfinite(m.float()).all() and rel < 0.1, rel
        ran.append(dtype)
    if not ran:
        pytest.skip("this CPU build has no bfloat16/float16 kernels for conv/group_norm")


def test_parity_with_diffusers_sd15_layout():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    cfg = dict(
        block_out_channels=[64, 128, 256, 256],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        attention_head_dim=8,
        cross_attention_dim=768,
        conditioning_embedding_out_channels=[16, 32, 96, 256],
    )
    ref = diffusers.ControlNetModel.from_config(cfg).eval()
    _randomize(ref, gen)
    net = IdentityNet.from_state_dict(ref.state_dict())  # config inferred: conv proj_in, 8 heads
    assert net.add_embedding is None
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, 768, generator=gen)
    hint = torch.rand(2, 3, 128, 128, generator=gen)
    with torch.no_grad():
        out = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=True)
        downs, mid = net(x, t, ctx, None, hint)
    assert len(downs) == 12 == len(residual_targets(cfg))
    pairs = list(zip(downs + [mid], list(out.down_block_res_samples) + [out.mid_block_res_sample]))
    diff = max((a - b).abs().max().item() for a, b in pairs)
    mag = max(b.abs().max().item() for _, b in pairs)
    print(f"\nSD1.5-layout ControlNet vs diffusers max abs diff {diff:.3e} (max |residual| {mag:.3e})")
    assert diff <= 1e-5 * max(1.0, mag)
