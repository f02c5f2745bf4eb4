"""The patched webui UNet (real ldm class) against diffusers' own IP-Adapter attention.

Same UNet weights, same to_k_ip/to_v_ip weights, same projected tokens: diffusers runs its
IPAdapterAttnProcessor2_0 with per-row image embeddings (face for cond rows, zeros for uncond
rows); we run the webui UNet with our hooks and per-row labels.
"""

import pytest
import torch


from lib_instantid.hooks import count_hooks
from lib_instantid.ip_attention import AttentionUnit
from lib_instantid.session import GenerationPatch, Schedule
from lib_instantid.unet_layers import cross_attention_layers

from unets import CallsUNet, SDXL_CONTEXT, diffusers_twin, sdxl_inputs, sdxl_like

diffusers = pytest.importorskip("diffusers")




@pytest.fixture(scope="module")
def unets():
    ldm = sdxl_like()
    twin = diffusers_twin(ldm, "sdxl")
    layers = cross_attention_layers(ldm)
    g = torch.Generator().manual_seed(3)
    ip = {}
    for layer in layers:
        ip[f"{layer.key}.to_k_ip.weight"] = torch.randn(layer.inner_dim, SDXL_CONTEXT, generator=g) * 0.05
        ip[f"{layer.key}.to_v_ip.weight"] = torch.randn(layer.inner_dim, SDXL_CONTEXT, generator=g) * 0.05
    image_proj = {"proj.weight": torch.randn(4 * SDXL_CONTEXT, 1024, generator=g) * 0.05,
                  "proj.bias": torch.randn(4 * SDXL_CONTEXT, generator=g) * 0.05,
                  "norm.weight": torch.ones(SDXL_CONTEXT), "norm.bias": torch.randn(SDXL_CONTEXT, generator=g)}
    twin._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip}, low_cpu_mem_usage=False)
    return ldm, twin, layers, ip


def _unit(twin, layers, ip, emb):
    proj = twin.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        tokens = proj(torch.stack([emb, torch.zeros_like(emb)]))  # [2 kinds, 4, 2048]
    weights = {l.index: (ip[f"{l.key}.to_k_ip.weight"], ip[f"{l.key}.to_v_ip.weight"]) for l in layers}
    return AttentionUnit("test adapter", tokens, weights)


@pytest.mark.parametrize("kinds", [[0, 1], [0, 0, 1], [1, 0], [0, 0, 0], [1, 1]])
def test_patched_webui_unet_matches_diffusers(unets, kinds):
    ldm, twin, layers, ip = unets
    emb = torch.randn(1024, generator=torch.Generator().manual_seed(5))
    x, t, ctx, y, add = sdxl_inputs(len(kinds))
    rows = torch.stack([emb if k == 0 else torch.zeros_like(emb) for k in kinds])
    for proc in twin.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.8]
    with torch.no_grad():
        expected = twin(x, t, ctx, added_cond_kwargs={**add, "image_embeds": [rows[:, None]]}).sample

    # order x_in as the webui does (cond rows first) and call the model on it
    order = sorted(range(len(kinds)), key=lambda i: kinds[i])
    n_cond = sum(1 for k in kinds if k == 0)
    x_in = x[order].contiguous()
    model = CallsUNet(ldm)
    before = count_hooks(ldm) + count_hooks(model)
    with torch.no_grad(), GenerationPatch(ldm, [(_unit(twin, layers, ip, emb), Schedule(0.8))]) as patch:
        patch.begin_step(x_in, n_cond, step=0, total_steps=10, model=model)
        out = model(x_in, t[order], context=ctx[order], y=y[order])
    assert count_hooks(ldm) + count_hooks(model) == before
    got = torch.empty_like(out)
    got[torch.tensor(order)] = out
    diff = (got - expected).abs().max().item()
    print("max abs diff", kinds, diff)
    assert diff < 1e-4, diff


def test_image_term_is_real(unets):
    """Guard against a vacuous parity: the IP term changes the output."""
    ldm, twin, layers, ip = unets
    emb = torch.randn(1024)
    x, t, ctx, y, _ = sdxl_inputs(1)
    with torch.no_grad():
        plain = ldm(x, t, context=ctx, y=y)
        model = CallsUNet(ldm)
        with GenerationPatch(ldm, [(_unit(twin, layers, ip, emb), Schedule(0.8))]) as patch:
            patch.begin_step(x, 1, 0, 10, model)
            patched = model(x, t, context=ctx, y=y)
        after = ldm(x, t, context=ctx, y=y)
    assert (patched - plain).abs().max() > 1e-3
    assert torch.equal(after, plain)


def test_attention_mask_limits_the_image_term(unets):
    """A black mask removes the image term, a white one keeps it whole, a half mask acts in between."""
    ldm, twin, layers, ip = unets
    emb = torch.randn(1024, generator=torch.Generator().manual_seed(2))
    x, t, ctx, y, _ = sdxl_inputs(1)

    def run(mask):
        unit = _unit(twin, layers, ip, emb)
        unit.mask = mask
        model = CallsUNet(ldm)
        with torch.no_grad(), GenerationPatch(ldm, [(unit, Schedule(0.8))]) as patch:
            patch.begin_step(x, 1, 0, 10, model)
            return model(x, t, context=ctx, y=y)

    with torch.no_grad():
        plain = ldm(x, t, context=ctx, y=y)
    full = run(None)
    assert torch.allclose(run(torch.zeros(64, 64)), plain, atol=1e-6)
    assert torch.allclose(run(torch.ones(64, 64)), full, atol=1e-6)
    half = torch.zeros(64, 64)
    half[:, :32] = 1.0
    partial = run(half)
    assert (partial - plain).abs().max() > 1e-4 and (partial - full).abs().max() > 1e-4
