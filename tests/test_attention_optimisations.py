"""The IP term must not depend on which cross-attention forward the webui installed.

The webui replaces ``CrossAttention.forward`` at class level with one of its optimisations. They
differ in how they reach the output projection: V1/Doggettx/InvokeAI/xformers/None call
``self.to_out(...)``; sdp and sdp-no-mem call ``self.to_out[0]`` then ``self.to_out[1]``;
sub-quadratic unpacks ``out_proj, dropout = self.to_out``. Each style is reproduced here (our own
code, same structure) and the patched UNet must give the same output under all of them.
"""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from ldm.modules.attention import CrossAttention

from lib_instantid.ip_attention import AttentionUnit
from lib_instantid.session import GenerationPatch, Schedule
from lib_instantid.unet_layers import cross_attention_layers

from unets import CallsUNet, sdxl_inputs, sdxl_like


def _heads(self, x, context):
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    return q, k, v


def sequential_style(self, x, context=None, mask=None, **kwargs):      # V1, Doggettx, xformers, None
    q, k, v = _heads(self, x, context)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=self.heads) for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1) @ v
    return self.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=self.heads))


def sdp_style(self, x, context=None, mask=None, **kwargs):             # sdp, sdp-no-mem
    q, k, v = _heads(self, x, context)
    b = q.shape[0]
    q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, self.heads * q.shape[-1])
    out = self.to_out[0](out)
    return self.to_out[1](out)


def subquad_style(self, x, context=None, mask=None, **kwargs):         # sub-quadratic: chunks of queries
    q, k, v = _heads(self, x, context)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=self.heads) for t in (q, k, v))
    chunks = [torch.softmax(qc @ k.transpose(1, 2) * self.scale, dim=-1) @ v for qc in q.split(37, dim=1)]
    out = rearrange(torch.cat(chunks, dim=1), "(b h) n d -> b n (h d)", h=self.heads)
    out_proj, dropout = self.to_out
    return dropout(out_proj(out))


@pytest.fixture(scope="module")
def setup():
    unet = sdxl_like()
    g = torch.Generator().manual_seed(4)
    weights = {l.index: (torch.randn(l.inner_dim, 2048, generator=g) * 0.05,
                         torch.randn(l.inner_dim, 2048, generator=g) * 0.05) for l in cross_attention_layers(unet)}
    tokens = torch.randn(2, 16, 2048, generator=g)
    return unet, weights, tokens




def _run(setup, forward, patched):
    unet, weights, tokens = setup
    x, t, ctx, y, _ = sdxl_inputs(2, seed=9)
    original = CrossAttention.forward
    CrossAttention.forward = forward
    try:
        model = CallsUNet(unet)
        with torch.no_grad():
            if not patched:
                return model(x, t, context=ctx, y=y)
            with GenerationPatch(unet, [(AttentionUnit("u", tokens, weights), Schedule(0.9))]) as patch:
                patch.begin_step(x, 1, 0, 10, model)
                return model(x, t, context=ctx, y=y)
    finally:
        CrossAttention.forward = original


def test_every_attention_style_gives_the_same_patched_output(setup):
    ref_plain = _run(setup, sequential_style, patched=False)
    ref = _run(setup, sequential_style, patched=True)
    assert (ref - ref_plain).abs().max() > 1e-3          # the IP term is there
    for style in (sdp_style, subquad_style):
        assert (_run(setup, style, patched=False) - ref_plain).abs().max() < 1e-5
        assert (_run(setup, style, patched=True) - ref).abs().max() < 1e-5, style.__name__
