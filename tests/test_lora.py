"""FaceID's LoRA by hooks on the webui UNet (real ldm class) against diffusers with the LoRA merged.

The oracle: a diffusers twin with the same weights, its processor order mapped to modules by
diffusers' own ``_load_ip_adapter_loras``, and ``W + s * up @ down`` merged into to_q / to_k / to_v /
to_out[0] of every attention (the official LoRA has no alpha). With the IP-Adapter attention on top,
the twin's ``IPAdapterAttnProcessor2_0`` on merged weights is exactly the official
``LoRAIPAttnProcessor``: the IP attention uses the LoRA query and to_out's LoRA sees the IP term.
"""

import contextlib

import pytest
import torch
from torch import nn

from lib_instantid.errors import InstantIDError
from lib_instantid.hooks import HookSet, count_hooks
from lib_instantid.ip_attention import AttentionUnit, CallState, IPAttentionPatch
from lib_instantid.lora import LoraPatch
from lib_instantid.unet_layers import CrossAttnLayer, cross_attention_layers

from unets import diffusers_twin, sd15_like, sdxl_full_meta, sdxl_inputs, sdxl_like

diffusers = pytest.importorskip("diffusers")

RANK = 8
PROJ = {"to_q": lambda a: a.to_q, "to_k": lambda a: a.to_k, "to_v": lambda a: a.to_v,
        "to_out": lambda a: a.to_out[0]}


def random_lora(layers, seed=7, rank=RANK, scale=0.05, device=None):
    """A FaceID-style LoRA (processor index -> tensors) with the shapes of ``layers``' attentions."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in layers:
        for n, attn in ((2 * layer.index, layer.self_attn), (2 * layer.index + 1, layer.module)):
            tensors = {}
            for name, get in PROJ.items():
                linear = get(attn)
                shape_down, shape_up = (rank, linear.in_features), (linear.out_features, rank)
                if device == "meta":
                    down, up = torch.empty(shape_down, device="meta"), torch.empty(shape_up, device="meta")
                else:
                    down = torch.randn(shape_down, generator=g) * scale
                    up = torch.randn(shape_up, generator=g) * scale
                tensors[f"{name}_lora.down.weight"], tensors[f"{name}_lora.up.weight"] = down, up
            lora[n] = tensors
    return lora


def _merge_plan(twin, lora):
    """(weight, up, down) for every LoRA pair, modules found by diffusers' own processor-index map."""
    flat = {f"{n}.{key}": t for n, tensors in lora.items() for key, t in tensors.items()}
    by_name = twin._load_ip_adapter_loras([{"ip_adapter": flat}])[0]
    assert len(by_name) == 8 * len(lora)
    plan = []
    for key, down in by_name.items():
        if key.endswith("_lora.down.weight"):
            path, proj = key[len("unet."):-len("_lora.down.weight")].rsplit(".", 1)
            attn = twin.get_submodule(path[: -len(".processor")])
            plan.append((PROJ[proj](attn).weight, by_name[key.replace(".down.", ".up.")], down))
    return plan


@contextlib.contextmanager
def merged(twin, lora, strength):
    """The diffusers twin with ``W += strength * up @ down`` on every attention projection, then restored."""
    plan = _merge_plan(twin, lora)
    saved = [w.detach().clone() for w, _, _ in plan]
    with torch.no_grad():
        for w, up, down in plan:
            w.add_(strength * (up @ down))
    try:
        yield twin
    finally:
        with torch.no_grad():
            for (w, _, _), original in zip(plan, saved):
                w.copy_(original)


def sd15_inputs(batch, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, 768, generator=g))


@pytest.fixture(scope="module")
def sd15():
    ldm = sd15_like()
    twin = diffusers_twin(ldm, "sd15")
    layers = cross_attention_layers(ldm)
    return ldm, twin, layers, random_lora(layers)


@pytest.fixture(scope="module")
def sd15_plain(sd15):
    x, t, ctx = sd15_inputs(1)
    with torch.no_grad():
        return (x, t, ctx), sd15[0](x, t, context=ctx)


def _run_with_lora(ldm, layers, lora, strength, *inputs, **kw):
    hooks = HookSet()
    try:
        LoraPatch(layers, lora, strength).install(hooks)
        with torch.no_grad():
            return ldm(*inputs, **kw)
    finally:
        hooks.remove()


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sd15_lora_matches_merged_diffusers(sd15, sd15_plain, strength):
    ldm, twin, layers, lora = sd15
    (x, t, ctx), plain = sd15_plain
    with torch.no_grad(), merged(twin, lora, strength) as oracle:
        expected = oracle(x, t, ctx).sample
    got = _run_with_lora(ldm, layers, lora, strength, x, t, context=ctx)
    diff = (got - expected).abs().max().item()
    print(f"SD1.5 LoRA strength {strength}: max abs diff {diff:.2e}, "
          f"LoRA effect {(got - plain).abs().max().item():.3f}")
    assert (got - plain).abs().max() > 1e-2     # the LoRA really changes the output
    assert diff < 1e-4, diff


def test_sdxl_lora_matches_merged_diffusers():
    ldm = sdxl_like(depth=1)
    twin = diffusers_twin(ldm, "sdxl", depth=1)
    layers = cross_attention_layers(ldm)
    lora = random_lora(layers, seed=11)
    x, t, ctx, y, add = sdxl_inputs(1)
    with torch.no_grad(), merged(twin, lora, 0.8) as oracle:
        expected = oracle(x, t, ctx, added_cond_kwargs=add).sample
    with torch.no_grad():
        plain = ldm(x, t, context=ctx, y=y)
    got = _run_with_lora(ldm, layers, lora, 0.8, x, t, context=ctx, y=y)
    diff = (got - expected).abs().max().item()
    print(f"SDXL LoRA strength 0.8: max abs diff {diff:.2e}, LoRA effect {(got - plain).abs().max().item():.3f}")
    assert (got - plain).abs().max() > 1e-2
    assert diff < 1e-4, diff


def test_lora_never_touches_weights_and_restores_exactly(sd15, sd15_plain):
    ldm, _, layers, lora = sd15
    (x, t, ctx), plain = sd15_plain
    before = {k: v.clone() for k, v in ldm.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in ldm.state_dict().items()}
    n_hooks = count_hooks(ldm)
    hooks = HookSet()
    LoraPatch(layers, lora, 1.0).install(hooks)
    assert len(hooks) == 8 * len(layers)            # to_q, to_k, to_v, to_out[0] of attn1 and attn2
    with torch.no_grad():
        patched = ldm(x, t, context=ctx)
    during = ldm.state_dict()
    assert all(torch.equal(during[k], before[k]) and during[k].data_ptr() == ptrs[k] for k in before)
    hooks.remove()
    assert count_hooks(ldm) == n_hooks
    with torch.no_grad():
        after = ldm(x, t, context=ctx)
    after_sd = ldm.state_dict()
    assert after_sd.keys() == before.keys()
    assert all(torch.equal(after_sd[k], before[k]) and after_sd[k].data_ptr() == ptrs[k] for k in before)
    assert not torch.equal(patched, plain)
    assert torch.equal(after, plain)


def test_strength_zero_installs_nothing(sd15):
    ldm, _, layers, lora = sd15
    hooks = HookSet()
    LoraPatch(layers, lora, 0.0).install(hooks)
    assert len(hooks) == 0


def test_sdxl_lora_on_sd15_unet_is_a_readable_error(sd15):
    ldm, _, layers, _ = sd15
    sdxl_lora = random_lora(cross_attention_layers(sdxl_full_meta()), rank=128, device="meta")
    hooks = HookSet()
    patch = LoraPatch(layers, sdxl_lora, 1.0, name="ip-adapter-faceid_sdxl.bin")
    with pytest.raises(InstantIDError) as err:
        patch.install(hooks)
    message = str(err.value)
    print(message)
    assert "ip-adapter-faceid_sdxl.bin" in message and "SDXL" in message and "SD 1.5" in message
    assert "140 attention processors" in message and "32 attention processors" in message
    assert len(hooks) == 0 and count_hooks(ldm) == 0


def test_wrong_sizes_or_missing_tensors_are_readable_errors(sd15):
    _, _, layers, lora = sd15
    wrong = {n: dict(t) for n, t in lora.items()}     # same processors, one of other size
    down = wrong[7]["to_q_lora.down.weight"]
    wrong[7]["to_q_lora.down.weight"] = torch.zeros(down.shape[0], down.shape[1] * 2)
    with pytest.raises(InstantIDError, match="different layer sizes"):
        LoraPatch(layers, wrong, 1.0).validate()
    partial = {n: dict(t) for n, t in lora.items()}
    del partial[5]["to_v_lora.up.weight"]
    with pytest.raises(InstantIDError, match="missing LoRA tensors"):
        LoraPatch(layers, partial, 1.0).validate()
    LoraPatch(layers, lora, 1.0).validate()


class _Attention(nn.Module):
    def __init__(self, dim, ctx):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(ctx, dim, bias=False), \
            nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))


def test_lora_follows_the_compute_dtype_and_keeps_the_unet_dtype_until_then():
    """lowvram/medvram, a precision change after install or autocast: the LoRA moves lazily, once."""
    attn1, attn2 = _Attention(16, 16), _Attention(16, 24)
    layer = CrossAttnLayer(0, "input_blocks.1.1.transformer_blocks.0.attn2", attn2, attn1, "input")
    lora = random_lora([layer])
    hooks = HookSet()
    LoraPatch([layer], lora, 0.5).install(hooks)
    terms = [fn for m in (attn1.to_q, attn2.to_k) for fn in m._forward_hooks.values()]
    assert all(term.down.dtype == torch.float32 for term in terms)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    attn2.to(torch.float64)
    with torch.no_grad():
        got = attn2.to_k(x)
    down, up = lora[1]["to_k_lora.down.weight"].double(), lora[1]["to_k_lora.up.weight"].double()
    expected = x @ attn2.to_k.weight.t() + 0.5 * (x @ down.t() @ up.t())
    assert torch.allclose(got, expected, atol=1e-6)
    assert terms[1].down.dtype == torch.float64
    attn1.to(torch.float32)
    y = torch.randn(2, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # webui's autocast: fp32 in, low out
        got = attn1.to_q(y)
    down, up = lora[0]["to_q_lora.down.weight"], lora[0]["to_q_lora.up.weight"]
    assert got.dtype == torch.bfloat16 and terms[0].down.dtype == torch.bfloat16
    assert torch.allclose(got.float(), y @ attn1.to_q.weight.t() + 0.5 * (y @ down.t() @ up.t()), atol=3e-2)
    hooks.remove()
    assert not attn1.to_q._forward_hooks and not attn2.to_k._forward_hooks


# -- the LoRA together with the IP attention: order of installation -----------------------------


@pytest.fixture(scope="module")
def sd15_ip(sd15):
    """The twin with diffusers' IP-Adapter attention loaded (restored to plain attention afterwards)."""
    ldm, twin, layers, lora = sd15
    g = torch.Generator().manual_seed(4)
    ip = {}
    for layer in layers:
        ip[f"{layer.key}.to_k_ip.weight"] = torch.randn(layer.inner_dim, 768, generator=g) * 0.05
        ip[f"{layer.key}.to_v_ip.weight"] = torch.randn(layer.inner_dim, 768, generator=g) * 0.05
    image_proj = {"proj.weight": torch.randn(4 * 768, 1024, generator=g) * 0.05,
                  "proj.bias": torch.randn(4 * 768, generator=g) * 0.05,
                  "norm.weight": torch.ones(768), "norm.bias": torch.randn(768, generator=g)}
    plain_processors = twin.attn_processors
    twin._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip}, low_cpu_mem_usage=False)
    for proc in twin.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.8]
    emb = torch.randn(1024, generator=g)
    with torch.no_grad():
        tokens = twin.encoder_hid_proj.image_projection_layers[0](torch.stack([emb, torch.zeros_like(emb)]))
    weights = {l.index: (ip[f"{l.key}.to_k_ip.weight"], ip[f"{l.key}.to_v_ip.weight"]) for l in layers}
    yield emb, tokens, weights
    twin.set_attn_processor(plain_processors)
    twin.encoder_hid_proj = None
    twin.register_to_config(encoder_hid_dim_type=None)


def _run_with_lora_and_ip(ldm, layers, lora, unit, kinds, x, t, ctx, lora_first=True):
    state = CallState()
    state.unit_scales = [0.8]
    state.set_call(torch.tensor(kinds))
    unit.prepare(layers, torch.device("cpu"), torch.float32)
    hooks = HookSet()
    try:
        patches = [LoraPatch(layers, lora, 0.6), IPAttentionPatch(layers, [unit], state)]
        for patch in (patches if lora_first else patches[::-1]):
            patch.install(hooks)
        with torch.no_grad():
            return ldm(x, t, context=ctx)
    finally:
        hooks.remove()


def test_lora_with_ip_attention_matches_official_order(sd15, sd15_ip):
    ldm, twin, layers, lora = sd15
    emb, tokens, weights = sd15_ip
    kinds = [0, 1]       # a cond row (face) and an uncond row (zero embedding)
    x, t, ctx = sd15_inputs(2, seed=5)
    rows = torch.stack([emb, torch.zeros_like(emb)])
    with torch.no_grad(), merged(twin, lora, 0.6) as oracle:
        expected = oracle(x, t, ctx, added_cond_kwargs={"image_embeds": [rows[:, None]]}).sample
    unit = AttentionUnit("faceid", tokens, weights)
    got = _run_with_lora_and_ip(ldm, layers, lora, unit, kinds, x, t, ctx)
    diff = (got - expected).abs().max().item()
    wrong = _run_with_lora_and_ip(ldm, layers, lora, unit, kinds, x, t, ctx, lora_first=False)
    wrong_diff = (wrong - expected).abs().max().item()
    print(f"LoRA + IP (SD1.5, LoRA 0.6, IP 0.8): max abs diff {diff:.2e}; IP hooks first: {wrong_diff:.2e}")
    assert diff < 1e-4, diff
    assert wrong_diff > 1e-3    # the order matters: the IP attention must see the LoRA query
