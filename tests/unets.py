"""Real webui UNet classes for tests, and diffusers twins of them with the same weights.

The webui runs ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` for SD1.x (PyPI
``stable-diffusion-sdkit`` carries that exact code) and sgm's ``UNetModel`` for SDXL. sgm is not on
PyPI, but its UNet is ldm's UNet with two generalisations: per-level transformer depth and an
``adm`` label embedding (``num_classes == "sequential"``: Linear, SiLU, Linear on ``y``). Both are
reproduced here on the real ldm class: ``sdxl_like`` builds ldm's UNetModel in SDXL's topology
(no attention at the first level, linear projections, 64-dim heads, context 2048, ``y`` of 2816)
and gives it sgm's label embedding, so module paths and forward are the webui's.

``diffusers_twin`` builds the matching diffusers ``UNet2DConditionModel`` and ``to_ldm`` renames its
state dict to ldm names (the inverse of diffusers' own ldm->diffusers converter), so both run on
identical weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel

SDXL_CONTEXT, SDXL_ADM = 2048, 2816


class SgmSpatialTransformer(SpatialTransformer):
    """sgm's one difference from ldm's SpatialTransformer: one context serves every block."""

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        return super().forward(x, context)


def _no_zero_params(unet: nn.Module) -> nn.Module:
    """ldm zero-initialises output layers (the UNet would output 0): give them small random values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in unet.parameters():
            if not torch.count_nonzero(p):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def sdxl_like(width: int = 64, depth: int = 2) -> UNetModel:
    """ldm UNetModel in SDXL topology at reduced width (levels width, 2w, 4w)."""
    torch.manual_seed(0)
    unet = UNetModel(
        image_size=32, in_channels=4, model_channels=width, out_channels=4, num_res_blocks=2,
        attention_resolutions=[4, 2], channel_mult=[1, 2, 4], num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=depth,
        context_dim=[SDXL_CONTEXT] * depth, legacy=False)
    return _no_zero_params(_as_sgm(unet, width)).eval()


def _as_sgm(unet: UNetModel, width: int) -> UNetModel:
    """sgm's two generalisations on an ldm UNet: one context for every transformer block, and the
    ``adm`` label embedding of ``y`` (built on the device the UNet was built on)."""
    for module in unet.modules():
        if isinstance(module, SpatialTransformer):
            module.__class__ = SgmSpatialTransformer
    ted = width * 4
    device = unet.time_embed[0].weight.device
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(SDXL_ADM, ted, device=device), nn.SiLU(),
                                                 nn.Linear(ted, ted, device=device)))
    return unet


def sd15_like(width: int = 64) -> UNetModel:
    """ldm UNetModel in SD1.5 topology at reduced width (levels w, 2w, 4w, 4w; 8 heads)."""
    torch.manual_seed(0)
    return _no_zero_params(UNetModel(
        image_size=32, in_channels=4, model_channels=width, out_channels=4, num_res_blocks=2,
        attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=8,
        use_spatial_transformer=True, transformer_depth=1, context_dim=768, legacy=False)).eval()


def diffusers_config(kind: str, width: int = 64, depth: int = 2) -> dict:
    if kind == "sdxl":
        w = [width, width * 2, width * 4]
        return dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=w,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    transformer_layers_per_block=[1, depth, depth], attention_head_dim=[c // 64 for c in w],
                    cross_attention_dim=SDXL_CONTEXT, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=SDXL_ADM, norm_num_groups=32)
    w = [width, width * 2, width * 4, width * 4]
    return dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=w,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return _RESNET[head] + "." + tail


def to_ldm_key(key: str, up_has_attention) -> str:
    """diffusers UNet/ControlNet key -> ldm key (layers_per_block = 2)."""
    L = 2
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (L + 1) + j
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (L + 1) + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        b = int(m[1])
        return f"output_blocks.{b * (L + 1) + L}.{2 if up_has_attention(b) else 1}.conv.{m[2]}"
    raise KeyError(key)


def to_ldm(state_dict: dict, config: dict) -> dict:
    up_types = config["up_block_types"]
    has_attn = lambda b: up_types[b].startswith("CrossAttn")  # noqa: E731
    return {to_ldm_key(k, has_attn): v for k, v in state_dict.items()}


def diffusers_twin(ldm_unet: UNetModel, kind: str, width: int = 64, depth: int = 2):
    """A diffusers UNet with random weights, copied into ``ldm_unet`` (strict); returns it."""
    from diffusers import UNet2DConditionModel

    config = diffusers_config(kind, width, depth)
    torch.manual_seed(1)
    twin = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping shows
        for name, p in twin.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    ldm_unet.load_state_dict(to_ldm(twin.state_dict(), config), strict=True)
    return twin


def sinusoid(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """sgm/ldm timestep embedding (cos first) of every number in ``values`` [B, n] -> [B, n*dim]."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float().reshape(-1, 1) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.reshape(values.shape[0], -1)


def sdxl_inputs(batch: int, size: int = 16, seed: int = 0):
    """x, t, text context, y (webui layout) and the diffusers added_cond_kwargs for the same y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, 77, SDXL_CONTEXT, generator=g)
    pooled = torch.randn(batch, 1280, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
    y = torch.cat([pooled, sinusoid(time_ids)], dim=1)
    return x, t, ctx, y, {"text_embeds": pooled, "time_ids": time_ids}


def sdxl_full_meta() -> UNetModel:
    """The full-size SDXL UNet topology (sgm: depths 2 and 10) on the meta device, ldm classes."""
    with torch.device("meta"):
        unet = UNetModel(
            image_size=128, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
            attention_resolutions=[4, 2], channel_mult=[1, 2, 4], num_head_channels=64,
            use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=10,
            context_dim=[SDXL_CONTEXT] * 10, legacy=False)
    for name, module in unet.named_modules():   # the 640-wide level has depth 2 in SDXL
        if isinstance(module, SpatialTransformer) and module.proj_in.in_features == 640:
            module.transformer_blocks = module.transformer_blocks[:2]
    return _as_sgm(unet, 320)


def sd15_full_meta() -> UNetModel:
    with torch.device("meta"):
        return UNetModel(
            image_size=64, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
            attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=8,
            use_spatial_transformer=True, transformer_depth=1, context_dim=768, legacy=False)


class CallsUNet(nn.Module):
    """Stands in for the webui's k-diffusion wrapper: the module the CFG denoiser calls with views of x_in."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, y=None):
        return self.unet(x, t, context=context, y=y)
