"""Shared fixtures: the webui test double, a small SDXL-topology webui UNet, and model files in
the published formats (reduced widths) written where users keep them.

Widths are reduced so that everything runs on a CPU in seconds; key names, containers and
dtypes are those of the published files (full-size shapes are checked on the meta device in the
format tests).
"""

import importlib.util
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEBUI = os.path.join(HERE, "webui")

SMALL_IDENTITYNET = {"block_out_channels": [64, 128, 256], "attention_head_dim": [1, 2, 4],
                     "transformer_layers_per_block": [1, 2, 2]}


@pytest.fixture(autouse=True)
def _offline_home(tmp_path, monkeypatch):
    """insightface must never write to ~/.insightface or reach the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _import_webui():
    if WEBUI not in sys.path:
        sys.path.insert(0, WEBUI)
    import modules.paths_internal  # noqa: F401
    import modules.shared  # noqa: F401
    return sys.modules["modules"]


@pytest.fixture(scope="session")
def webui():
    """The webui test double (``modules.*``)."""
    return _import_webui()


@pytest.fixture(scope="session")
def sdxl_unet():
    from unets import sdxl_like
    return sdxl_like()


def write_instantid_adapter(path, unet, seed=0):
    """An InstantID ip-adapter.bin (nested torch pickle) for ``unet``: Resampler 512 -> 2048 with 16
    queries (width 128, 2 layers) and to_k_ip/to_v_ip for each of the UNet's cross-attention layers."""
    from lib_instantid.projection import Resampler
    from lib_instantid.unet_layers import cross_attention_layers

    g = torch.Generator().manual_seed(seed)
    proj = Resampler(dim=128, depth=2, heads=2, num_queries=16, embedding_dim=512, output_dim=2048, ff_inner_dim=512)
    image_proj = {k: (torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.1)
                      + (1.0 if "norm" in k and k.endswith("weight") else 0.0)) for k, v in proj.state_dict().items()}
    image_proj["latents"] = torch.randn(1, 16, 128, generator=g) / 128 ** 0.5
    ip = {}
    for layer in cross_attention_layers(unet):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{layer.key}.{name}.weight"] = torch.randn(layer.inner_dim, layer.context_dim, generator=g) * 0.02
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"image_proj": image_proj, "ip_adapter": ip}, path)


def write_identitynet(folder, seed=0):
    """A diffusers-format ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import save_file

    from lib_instantid.identitynet import INSTANTID_CONFIG, IdentityNet

    config = dict(INSTANTID_CONFIG, **SMALL_IDENTITYNET)
    torch.manual_seed(seed)
    net = IdentityNet(config)
    with torch.no_grad():
        for name, p in net.named_parameters():   # the published zero convs are trained: make them non-zero
            if name.startswith("controlnet_") and p.dim() > 1:
                p.normal_(0, 0.05)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, _class_name="ControlNetModel"), f)


@pytest.fixture(scope="session")
def sd15_unet():
    from unets import sd15_like
    return sd15_like()


def processor_dims(unet):
    """processor index -> inner dim (attn1 = 2k, attn2 = 2k+1) of a webui UNet."""
    from lib_instantid.unet_layers import cross_attention_layers
    dims = {}
    for layer in cross_attention_layers(unet):
        dims[layer.key - 1] = dims[layer.key] = layer.inner_dim
    return dims


def write_adapter_for(manifest, path, unet):
    """A published adapter layout (image projection at its real size) shrunk to ``unet``'s layers."""
    from model_factory import reduced_ip_adapter_shapes, write_model_file
    write_model_file(manifest, path, shape_override=reduced_ip_adapter_shapes(processor_dims(unet)), seed=1)


def write_small_clip_h(path, layers=2):
    """The ViT-H-14 image encoder's layout and widths with only ``layers`` transformer layers."""
    import re
    from model_factory import write_model_file

    def keep(key, shape):
        m = re.search(r"encoder\.layers\.(\d+)\.", key)
        return None if m and int(m.group(1)) >= layers else shape
    write_model_file("clip_vit_h_image_encoder_model.safetensors", path, shape_override=keep)


@pytest.fixture(scope="session")
def models_path(tmp_path_factory, sdxl_unet, sd15_unet):
    """A webui ``models`` folder: InstantID files, IP-Adapter / FaceID files, a CLIP ViT-H encoder,
    and the antelopev2 and buffalo_l face packs."""
    from face_pack import ASTRONAUT_BOX, ASTRONAUT_KPS, build_pack

    root = tmp_path_factory.mktemp("webui") / "models"
    write_instantid_adapter(str(root / "instantid" / "ip-adapter.bin"), sdxl_unet)
    write_identitynet(str(root / "instantid" / "ControlNetModel"))
    ipa = root / "ipadapter"
    write_adapter_for("ip-adapter-plus_sd15.safetensors", ipa / "ip-adapter-plus_sd15.safetensors", sd15_unet)
    write_adapter_for("ip-adapter-faceid_sd15.bin", ipa / "ip-adapter-faceid_sd15.bin", sd15_unet)
    write_adapter_for("ip-adapter_sdxl_vit-h.safetensors", ipa / "ip-adapter_sdxl_vit-h.safetensors", sdxl_unet)
    write_small_clip_h(root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    face = [(ASTRONAUT_BOX, ASTRONAUT_KPS, 0.98)]
    build_pack(str(root / "insightface"), det="constant", faces=face, image_size=(512, 512))
    build_pack(str(root / "insightface"), det="constant", faces=face, image_size=(512, 512), pack="buffalo_l",
               recognizer_seed=7)
    return root


@pytest.fixture(scope="session")
def astronaut():
    from skimage import data
    return data.astronaut()


@pytest.fixture(scope="session")
def script_module(webui, models_path):
    """scripts/instantid.py loaded as the webui loads it (by path, extension root on sys.path)."""
    webui.paths_internal.models_path = str(models_path)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("instantid.py", os.path.join(ROOT, "scripts", "instantid.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
