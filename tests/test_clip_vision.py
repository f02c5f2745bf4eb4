"""lib_instantid.clip_vision: the published encoders load, outputs and preprocessing match transformers.

Full-size layouts (ViT-H-14, ViT-bigG-14) are checked on the meta device from the manifests. Numbers
are compared with transformers' CLIPVisionModelWithProjection / CLIPModel at reduced depth (one
config at ViT-H's full width and head layout) with every parameter randomised, biases and norm
weights included; transformers is a test oracle only. Preprocessing is compared with
CLIPImageProcessor's PIL backend (the slow processor the official IP-Adapter code used).
"""

import pytest
import torch

from lib_instantid import clip_vision as cv
from lib_instantid.clip_vision import (
    CLIPVisionEncoder,
    EncoderDesc,
    config_from_shapes,
    describe_encoder,
    encoder_fits,
    load_clip_vision,
    mismatch_message,
    missing_encoder_message,
    preprocess,
    zero_pixels,
)
from lib_instantid.errors import ModelFileError
from lib_instantid.weights import read_tensor_infos

from model_factory import state_dict_from_manifest, write_model_file

VIT_H = "clip_vit_h_image_encoder_model.safetensors.json"
VIT_BIGG = "clip_vit_bigG_image_encoder_model.safetensors.json"
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Full size on meta
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest,name,hidden,proj,layers,heads", [
    (VIT_H, "ViT-H-14", 1280, 1024, 32, 16),
    (VIT_BIGG, "ViT-bigG-14", 1664, 1280, 48, 16),
])
@pytest.mark.parametrize("with_position_ids", [False, True])
def test_published_layouts_load_strictly(manifest, name, hidden, proj, layers, heads, with_position_ids):
    sd = state_dict_from_manifest(manifest, device="meta", include_optional=with_position_ids)
    assert ("vision_model.embeddings.position_ids" in sd) == with_position_ids
    assert describe_encoder(sd) == EncoderDesc(name, hidden, proj, layers)
    cfg = config_from_shapes(sd)
    assert (cfg.heads, cfg.image_size, cfg.patch, cfg.act, cfg.eps) == (heads, 224, 14, "gelu", 1e-5)
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    sd.pop("vision_model.embeddings.position_ids", None)
    model.load_state_dict(sd, strict=True, assign=True)
    embeds, hidden_states = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert embeds.shape == (2, proj) and hidden_states.shape == (2, 257, hidden)


def test_manifest_configs_say_exact_gelu():
    from model_factory import load_manifest
    for name in (VIT_H, VIT_BIGG):
        cfg = load_manifest(name)["hyperparameters"]["config_json"]
        assert cfg["hidden_act"] == "gelu" and cfg["layer_norm_eps"] == 1e-5


def test_describe_encoder_rejects_other_files():
    adapter = state_dict_from_manifest("ip-adapter_sd15.safetensors.json", device="meta")
    assert describe_encoder(adapter) is None
    assert describe_encoder({}) is None


# ----------------------------------------------------------------------------------------------
# Numerical parity with transformers (reduced)
# ----------------------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):  # layer_norm1/2, pre_layrnorm, post_layernorm
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(("class_embedding", "position_embedding.weight")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * min(0.2, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))


def _hf_vision(hidden, layers, heads, inter, image, proj, act="gelu", seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        image_size=image, patch_size=14, projection_dim=proj, hidden_act=act, layer_norm_eps=1e-5)
    config._attn_implementation = "eager"
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    _randomise(model, seed)
    return model


def _compare(hf, heads=None, act=None, batch=2, seed=1):
    sd = hf.state_dict()
    ours = CLIPVisionEncoder(config_from_shapes(sd, heads=heads, act=act))
    ours.load_state_dict(sd, strict=True)
    size = hf.config.image_size
    px = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        embeds, penult = ours(px)
        none, penult_only = ours(px, need_embeds=False)
    assert none is None
    assert torch.equal(penult, penult_only)
    d_embeds = (embeds - ref.image_embeds).abs().max().item()
    d_hidden = (penult - ref.hidden_states[-2]).abs().max().item()
    return d_embeds, d_hidden, ref


@pytest.mark.parametrize("hidden,layers,heads,inter,image,proj,act,pass_heads", [
    (128, 3, 2, 256, 56, 96, "gelu", False),          # head dim 64, heads from width // 64
    (160, 2, 2, 320, 56, 64, "gelu", True),           # ViT-H head dim (80)
    (208, 2, 2, 416, 42, 64, "quick_gelu", True),     # ViT-bigG head dim (104), OpenAI activation
    (1280, 2, 16, 5120, 224, 1024, "gelu", False),    # ViT-H width, heads from the table, 257 tokens
])
def test_parity_with_transformers(hidden, layers, heads, inter, image, proj, act, pass_heads):
    hf = _hf_vision(hidden, layers, heads, inter, image, proj, act)
    d_embeds, d_hidden, ref = _compare(hf, heads=heads if pass_heads else None, act=act)
    print(f"hidden {hidden} heads {heads} {act}: image_embeds {d_embeds:.2e}, hidden_states[-2] {d_hidden:.2e}, "
          f"ref scale {ref.image_embeds.abs().max():.2f} / {ref.hidden_states[-2].abs().max():.2f}")
    assert d_embeds <= ATOL * max(1.0, ref.image_embeds.abs().max().item())
    assert d_hidden <= ATOL * max(1.0, ref.hidden_states[-2].abs().max().item())


def test_zero_pixels_uncond_matches_official_recipe():
    hf = _hf_vision(128, 2, 2, 256, 56, 64)
    sd = hf.state_dict()
    ours = CLIPVisionEncoder(config_from_shapes(sd)).eval()
    ours.load_state_dict(sd)
    assert torch.equal(zero_pixels(56), torch.zeros(1, 3, 56, 56))
    px = torch.zeros_like(torch.randn(1, 3, 56, 56))  # official: zeros_like(normalised pixels)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        _, penult = ours(zero_pixels(56), need_embeds=False)
    assert (penult - ref).abs().max() <= ATOL


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _astronaut():
    skdata = pytest.importorskip("skimage.data")
    return skdata.astronaut()  # 512x512x3 uint8


@pytest.mark.parametrize("crop", ["square", "wide", "tall", "odd"])
def test_preprocess_matches_clip_image_processor(crop):
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the slow processor is PIL-based already
        Processor = transformers.CLIPImageProcessor
    img = _astronaut()
    img = {"square": img, "wide": img[40:340, :], "tall": img[:, 100:333], "odd": img[3:250, 7:400]}[crop]
    ours = preprocess(img)
    ref = torch.as_tensor(Processor()(images=img, return_tensors="np")["pixel_values"])
    assert ours.shape == ref.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    print(f"preprocess {crop} {img.shape[:2]}: max abs diff {diff:.2e}")
    assert diff <= 1e-6


def test_preprocess_accepts_pil_and_rejects_floats():
    from PIL import Image
    import numpy as np
    img = _astronaut()[:100, :150]
    assert torch.equal(preprocess(Image.fromarray(img)), preprocess(img))
    assert torch.equal(preprocess(Image.fromarray(img).convert("RGBA")), preprocess(img))
    with pytest.raises(ValueError):
        preprocess(img.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Loading files
# ----------------------------------------------------------------------------------------------

SMALL = {"hidden": 64, "heads": 2}


def _small_override(key, shape):
    """ViT-H key set at width 64, 2 layers, 56x56 images (17 positions), projection 48."""
    h = SMALL["hidden"]
    if key.startswith("vision_model.encoder.layers."):
        if int(key.split(".")[3]) >= 2:
            return None
    if key == "visual_projection.weight":
        return (48, h)
    if key.endswith("position_embedding.weight"):
        return (17, h)
    if key.endswith("position_ids"):
        return (1, 17)
    return tuple(h if s == 1280 else 4 * h if s == 5120 else s for s in shape)


def _reference(sd, px):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                           intermediate_size=256, image_size=56, patch_size=14,
                                           projection_dim=48, hidden_act="gelu")
    hf = transformers.CLIPVisionModelWithProjection(config).eval()
    hf.load_state_dict({k: v.float() for k, v in sd.items() if k != "vision_model.embeddings.position_ids"})
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def test_safetensors_file_loads_with_cast(tmp_path):
    path = write_model_file(VIT_H, tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                            shape_override=_small_override, include_optional=True)
    infos = read_tensor_infos(str(path))
    assert describe_encoder(infos) == EncoderDesc("ViT (64 wide, 2 layers)", 64, 48, 2)
    model = load_clip_vision(str(path), dtype=torch.float64, heads=1)
    assert model.vision_model.pre_layrnorm.weight.dtype == torch.float64
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    sd = state_dict_from_manifest(VIT_H, shape_override=_small_override)
    px = torch.randn(1, 3, 56, 56)
    embeds, penult = model(px)
    assert embeds.dtype == torch.float64
    ref_e, ref_h = _reference(sd, px)
    assert (embeds.float() - ref_e).abs().max() <= ATOL and (penult.float() - ref_h).abs().max() <= ATOL


def test_controlnet_clip_h_pth_loads(tmp_path):
    """sd-webui-controlnet's clip_h.pth: the transformers state dict (with position_ids) as a torch pickle."""
    sd = state_dict_from_manifest(VIT_H, shape_override=_small_override, include_optional=True)
    path = tmp_path / "clip_h.pth"
    torch.save(sd, path)
    model = load_clip_vision(str(path), heads=1)
    px = torch.randn(2, 3, 56, 56)
    ref_e, ref_h = _reference(sd, px)
    embeds, penult = model(px)
    assert (embeds - ref_e).abs().max() <= ATOL and (penult - ref_h).abs().max() <= ATOL


def test_full_clip_model_dict_loads(tmp_path):
    """clip_vitl.pth style: a whole CLIPModel (text tower, logit_scale) saved as .bin."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                           image_size=28, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=40)
    clip = transformers.CLIPModel(config).eval()
    _randomise(clip, 3)
    sd = clip.state_dict()
    assert any(k.startswith("text_model.") for k in sd) and "logit_scale" in sd
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    model = load_clip_vision(str(path), heads=1, act="quick_gelu")
    assert model.config.projection == 40 and model.config.image_size == 28
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        vis = clip.vision_model(pixel_values=px, output_hidden_states=True)
        ref_e = clip.visual_projection(vis.pooler_output)
    embeds, penult = model(px)
    assert (embeds - ref_e).abs().max() <= ATOL
    assert (penult - vis.hidden_states[-2]).abs().max() <= ATOL


def test_not_a_clip_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    other = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(other))
    adapter = write_model_file("ip-adapter_sd15.safetensors.json", tmp_path / "ip-adapter_sd15.safetensors")
    open_clip = tmp_path / "open_clip.safetensors"
    save_file({"visual.class_embedding": torch.zeros(8)}, str(open_clip))
    for path, detail in ((other, "no vision_model"), (adapter, "no vision_model"), (open_clip, "open_clip")):
        with pytest.raises(ModelFileError, match=path.name) as exc:
            load_clip_vision(str(path))
        assert detail in str(exc.value) and "models/clip_vision" in str(exc.value)


def test_incomplete_clip_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    sd = state_dict_from_manifest(VIT_H, shape_override=_small_override)
    broken = dict(sd)
    del broken["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelFileError, match="broken.safetensors.*fc2.bias"):
        load_clip_vision(str(tmp_path / "broken.safetensors"), heads=1)
    no_layers = {k: v for k, v in sd.items() if ".layers." not in k}
    save_file(no_layers, str(tmp_path / "no_layers.safetensors"))
    with pytest.raises(ModelFileError, match="no_layers.safetensors"):
        load_clip_vision(str(tmp_path / "no_layers.safetensors"))


# ----------------------------------------------------------------------------------------------
# Matching adapters and encoders
# ----------------------------------------------------------------------------------------------

H = EncoderDesc("ViT-H-14", 1280, 1024, 32)
G = EncoderDesc("ViT-bigG-14", 1664, 1280, 48)


def test_encoder_fits():
    assert encoder_fits(H, "clip_embeds", 1024) and not encoder_fits(G, "clip_embeds", 1024)
    assert encoder_fits(G, "clip_embeds", 1280) and not encoder_fits(H, "clip_embeds", 1280)
    assert encoder_fits(H, "clip_hidden", 1280) and not encoder_fits(G, "clip_hidden", 1280)
    assert encoder_fits(H, "face+clip_hidden", 1280)
    assert not encoder_fits(H, "face", 512)


def test_missing_encoder_messages():
    msg = missing_encoder_message("clip_hidden", 1280, ["/webui/models/clip_vision"])
    assert "ViT-H-14" in msg and "/webui/models/clip_vision" in msg
    assert "h94/IP-Adapter models/image_encoder/model.safetensors" in msg
    assert "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in msg
    assert missing_encoder_message("clip_embeds", 1024, []).count("CLIP-ViT-H-14") == 1
    msg = missing_encoder_message("clip_embeds", 1280, ["a", "b"])
    assert "ViT-bigG-14" in msg and "sdxl_models/image_encoder/model.safetensors" in msg
    assert "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors" in msg and "a, b" in msg
    assert "768-wide" in missing_encoder_message("clip_embeds", 768, ["x"])


def test_mismatch_message():
    msg = mismatch_message("ip-adapter_sdxl_vit-h", "clip_embeds", 1024, "CLIP-ViT-bigG.safetensors", G)
    assert "ip-adapter_sdxl_vit-h" in msg and "needs the CLIP ViT-H-14" in msg
    assert "is ViT-bigG-14 (1280-wide image embeds)" in msg and "CLIP-ViT-H-14-laion2B" in msg
    msg = mismatch_message("ip-adapter_sdxl", "clip_embeds", 1280, "clip_h.pth", H)
    assert "ViT-bigG-14 image encoder (1280-wide image embeds)" in msg and "is ViT-H-14 (1024-wide" in msg
    msg = mismatch_message("ip-adapter-plus_sd15", "clip_hidden", 1280, "g.safetensors", G)
    assert "is ViT-bigG-14 (1664-wide hidden states)" in msg
    assert "is not a CLIP image encoder" in mismatch_message("x", "clip_hidden", 1280, "y.bin", None)


def test_module_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, lib_instantid.clip_vision; "
            "sys.exit(int(any(m.split('.')[0] in ('transformers', 'diffusers') for m in sys.modules)))")
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
    assert cv.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)


def test_the_adapter_picks_its_encoder():
    """Each adapter family gets the encoder it was trained with; a forced wrong one is refused."""
    from lib_instantid.errors import ModelFileError
    from lib_instantid.model_files import Detected, ModelEntry
    from lib_instantid.references import pick_encoder

    vit_h = ModelEntry("clip_h.pth", "/m/clip_h.pth", Detected("clip_vision", "ViT-H-14", input_dim=1024, hidden=1280))
    big_g = ModelEntry("clip_g.safetensors", "/m/clip_g.safetensors",
                       Detected("clip_vision", "ViT-bigG-14", input_dim=1280, hidden=1664))

    class Adapter:
        def __init__(self, needs, width):
            self.name, self.detected = "adapter", Detected("adapter", "x", needs=needs, input_dim=width)

    encoders = [big_g, vit_h]
    assert pick_encoder(encoders, Adapter("clip_embeds", 1024), "", []) is vit_h       # sd15, sdxl_vit-h
    assert pick_encoder(encoders, Adapter("clip_embeds", 1280), "", []) is big_g       # sdxl, sd15_vit-G
    assert pick_encoder(encoders, Adapter("clip_hidden", 1280), "", []) is vit_h       # plus, full-face
    assert pick_encoder(encoders, Adapter("face+clip_hidden", 1280), "", []) is vit_h  # FaceID-Plus
    with pytest.raises(ModelFileError, match="needs the CLIP ViT-H-14 image encoder.*ViT-bigG-14"):
        pick_encoder(encoders, Adapter("clip_hidden", 1280), "clip_g.safetensors", [])
    with pytest.raises(ModelFileError, match="needs the CLIP ViT-bigG-14 image encoder"):
        pick_encoder([vit_h], Adapter("clip_embeds", 1280), "", ["models/clip_vision"])
