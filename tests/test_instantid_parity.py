"""InstantID end to end against diffusers as the oracle, on the same random weights.

- The Resampler tokens of our loader vs diffusers' IPAdapterPlusImageProjection.
- One UNet step of the patched webui UNet (real ldm class) with IdentityNet residuals and the IP
  attention vs diffusers' UNet2DConditionModel + ControlNetModel, per row cond/uncond.
- The CFG-combined prediction of the webui's CFG denoiser (test double of v1.10.1) in several batch
  layouts vs a reference that computes every row alone, with its label given explicitly.
"""

import json

import numpy as np
import pytest
import torch

from lib_instantid.adapters import load_adapter
from lib_instantid.identitynet import INSTANTID_CONFIG, IdentityNet
from lib_instantid.instantid import KpsHint
from lib_instantid.ip_attention import AttentionUnit
from lib_instantid.residuals import ControlUnit
from lib_instantid.tokens import References, unit_tokens
from lib_instantid.session import GenerationPatch, Schedule

from conftest import SMALL_IDENTITYNET
from unets import CallsUNet, diffusers_twin, sdxl_inputs, sdxl_like, sinusoid

diffusers = pytest.importorskip("diffusers")

KPS = np.array([[40.0, 50.0], [80.0, 52.0], [60.0, 75.0], [45.0, 95.0], [78.0, 96.0]], np.float32)
IP_SCALE, CN_SCALE = 0.8, 0.7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import ControlNetModel
    from lib_instantid.projection import Resampler
    from lib_instantid.unet_layers import cross_attention_layers

    ldm = sdxl_like()
    twin = diffusers_twin(ldm, "sdxl")
    g = torch.Generator().manual_seed(11)
    # Resampler at width 128 with the published depth 4, 64-dim heads and ff x4 (what diffusers assumes)
    proj = Resampler(dim=128, depth=4, heads=2, num_queries=16, embedding_dim=512, output_dim=2048, ff_inner_dim=512)
    image_proj = {k: torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("norm_out.weight") else 0.0)
                  for k, v in proj.state_dict().items()}
    ip = {}
    for layer in cross_attention_layers(ldm):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{layer.key}.{name}.weight"] = torch.randn(layer.inner_dim, 2048, generator=g) * 0.05
    path = tmp_path_factory.mktemp("iid") / "ip-adapter.bin"
    torch.save({"image_proj": image_proj, "ip_adapter": ip}, str(path))
    adapter = load_adapter(str(path))
    twin._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip}, low_cpu_mem_usage=False)
    for proc in twin.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [IP_SCALE]

    torch.manual_seed(12)
    cn = ControlNetModel.from_config(dict(INSTANTID_CONFIG, **SMALL_IDENTITYNET)).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_") and p.dim() > 1:
                p.normal_(0, 0.05)
    net = IdentityNet.from_state_dict(cn.state_dict(), json.loads(json.dumps(cn.config)))
    emb = torch.randn(512, generator=g) * 20   # raw antelopev2 embeddings have norm ~20-30
    return dict(ldm=ldm, twin=twin, adapter=adapter, cn=cn, net=net, emb=emb)


def face_tokens(models):
    """Our tokens for the (raw) face embedding: the product's own path (unit_tokens)."""
    return unit_tokens(models["adapter"], References(faces=models["emb"][None]))


def diffusers_tokens(twin, emb_rows):
    return twin.encoder_hid_proj([emb_rows[:, None, None, :]])[0][:, 0]


def test_resampler_tokens_match_diffusers(models):
    ours = face_tokens(models)
    with torch.no_grad():
        ref = diffusers_tokens(models["twin"], torch.stack([models["emb"], torch.zeros(512)]))
    assert ours.shape == (2, 16, 2048)
    assert (ours - ref).abs().max().item() < 1e-5


def _reference_rows(models, x, t, ctx, pooled, time_ids, kinds, hint):
    """diffusers: each row with its own label (0 face, 1 zero embedding), IdentityNet + IP-Adapter."""
    twin, cn, emb = models["twin"], models["cn"], models["emb"]
    emb_rows = torch.stack([emb if k == 0 else torch.zeros_like(emb) for k in kinds])
    add = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        tokens = diffusers_tokens(twin, emb_rows)
        res = cn(x, t, encoder_hidden_states=tokens, controlnet_cond=hint.expand(len(kinds), -1, -1, -1),
                 conditioning_scale=CN_SCALE, added_cond_kwargs=add, return_dict=True)
        return twin(x, t, ctx, added_cond_kwargs={**add, "image_embeds": [emb_rows[:, None, None, :]]},
                    down_block_additional_residuals=res.down_block_res_samples,
                    mid_block_additional_residual=res.mid_block_res_sample).sample


def _ours(models):
    tokens = face_tokens(models)
    hint = KpsHint(KPS, (128, 128))
    return GenerationPatch(models["ldm"], [(AttentionUnit("InstantID", tokens, models["adapter"].ip), Schedule(IP_SCALE))],
                           [(ControlUnit("InstantID", models["net"], tokens, hint), Schedule(CN_SCALE))]), hint




@pytest.mark.parametrize("kinds", [[0, 1], [0, 0, 1, 1], [1]])
def test_one_step_matches_diffusers(models, kinds):
    x, t, ctx, y, add = sdxl_inputs(len(kinds), size=16, seed=3)
    patch, hint = _ours(models)
    model = CallsUNet(models["ldm"])
    n_cond = sum(1 for k in kinds if k == 0)
    assert kinds == sorted(kinds)   # the webui's order: cond rows first
    with torch.no_grad(), patch:
        patch.begin_step(x, n_cond, 0, 10, model)
        got = model(x, t, context=ctx, y=y)
    ref = _reference_rows(models, x, t, ctx, add["text_embeds"], add["time_ids"], kinds,
                          hint(128, 128, torch.device("cpu"), torch.float32))
    diff = (got - ref).abs().max().item()
    print(f"one step {kinds}: max |ours - diffusers| = {diff:.2e} (output scale {ref.abs().max().item():.2f})")
    assert diff < 1e-4


# -- the CFG denoiser's layouts, one step each ------------------------------------------------------

LAYOUTS = {
    "default": dict(),
    "batch cond/uncond off": dict(opts={"batch_cond_uncond": False}),
    "separate cond/uncond calls": dict(cond_chunks=2),
    "separate calls, batch off": dict(cond_chunks=2, opts={"batch_cond_uncond": False}),
    "AND prompt": dict(and_rows=2),
    "batch of 2": dict(batch=2),
    "batch of 2, AND, batch off": dict(batch=2, and_rows=2, opts={"batch_cond_uncond": False}),
    "uncond longer, pad v0 off": dict(uncond_chunks=2),
    "chunks mixing cond and uncond": dict(batch=2, and_rows=[2, 1], opts={"batch_cond_uncond": False}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cfg_step_matches_rows_computed_alone(models, webui, script_module, layout):
    from modules import shared
    from modules.sd_samplers import CompVisDenoiser, SDXLModel
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser, DictWithShape, MultiCond

    spec = dict(LAYOUTS[layout])
    opts = {"batch_cond_uncond": True, "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
            "skip_early_cond": 0.0, **spec.pop("opts", {})}
    for k, v in opts.items():
        setattr(shared.opts, k, v)
    batch = spec.get("batch", 1)
    per_image = spec.get("and_rows", 1)
    per_image = per_image if isinstance(per_image, list) else [per_image] * batch
    n_cond = sum(per_image)
    first = [sum(per_image[:i]) for i in range(batch)]
    g = torch.Generator().manual_seed(21)
    ctx = torch.randn(n_cond, 77 * spec.get("cond_chunks", 1), 2048, generator=g)
    unctx = torch.randn(batch, 77 * spec.get("uncond_chunks", 1), 2048, generator=g)
    pooled_c, pooled_u = torch.randn(n_cond, 1280, generator=g), torch.randn(batch, 1280, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    tid_c, tid_u = time_ids.repeat(n_cond, 1), time_ids.repeat(batch, 1)
    cond = MultiCond([[(first[i] + j, 1.0 / n) for j in range(n)] for i, n in enumerate(per_image)],
                     DictWithShape(crossattn=ctx, vector=torch.cat([pooled_c, sinusoid(tid_c)], 1)))
    uncond = DictWithShape(crossattn=unctx, vector=torch.cat([pooled_u, sinusoid(tid_u)], 1))
    x = torch.randn(batch, 4, 16, 16, generator=g) * 3
    sigma = torch.full((batch,), 3.0)

    patch, hint = _ours(models)
    wrap = CompVisDenoiser(SDXLModel(models["ldm"]))
    cfg = CFGDenoiser(None, wrap)
    cfg.p = type("P", (), {script_module.PATCH_ATTR: patch, "is_hr_pass": False})()
    with torch.no_grad(), patch:
        got = cfg(x, sigma, uncond=uncond, cond=cond, cond_scale=5.0, s_min_uncond=0.0,
                  image_cond=torch.zeros(batch, 5, 1, 1))

    # reference: every row alone, label given, through the same k-diffusion scaling
    class RowModel:
        def apply_model(self, xr, t, cond):
            r = self.row
            if r < n_cond:
                c, p_, tid, kind = ctx[r:r + 1], pooled_c[r:r + 1], tid_c[r:r + 1], 0
            else:
                u = r - n_cond
                c, p_, tid, kind = unctx[u:u + 1], pooled_u[u:u + 1], tid_u[u:u + 1], 1
            return _reference_rows(models, xr, t, c, p_, tid, [kind],
                                   hint(128, 128, torch.device("cpu"), torch.float32))

    row_model = RowModel()
    ref_wrap = CompVisDenoiser(row_model)
    x_in = torch.cat([x[i:i + 1].repeat(n, 1, 1, 1) for i, n in enumerate(per_image)] + [x])
    s_in = torch.cat([sigma[i:i + 1].repeat(n) for i, n in enumerate(per_image)] + [sigma])
    outs = []
    with torch.no_grad():
        for r in range(x_in.shape[0]):
            row_model.row = r
            outs.append(ref_wrap(x_in[r:r + 1], s_in[r:r + 1], cond=None))
    ref = cfg.combine_denoised(torch.cat(outs), cond.conds_list, uncond, 5.0)
    diff = (got - ref).abs().max().item()
    print(f"{layout}: calls {cfg.calls}, max |denoised - reference| = {diff:.2e}")
    assert diff < 2e-4
