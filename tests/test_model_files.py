"""Model files: recognised by content from every published layout (manifests), full-size shapes on
the meta device, safe loading, and the folders users keep them in."""

import json
import os

import pytest
import torch

from lib_instantid.adapters import load_adapter
from lib_instantid.errors import InstantIDError, ModelFileError
from lib_instantid.ip_attention import AttentionUnit
from lib_instantid.model_files import classify, scan
from lib_instantid.model_cache import ModelCache
from lib_instantid.pipeline import Locations, _pick, list_models
from lib_instantid.session import _check_attention_unit
from lib_instantid.unet_layers import cross_attention_layers, unet_family
from lib_instantid.weights import TensorInfo, flatten, load_file, read_tensor_infos

from model_factory import load_manifest, manifest_names, state_dict_from_manifest, write_model_file
from unets import sd15_full_meta, sdxl_full_meta

EXPECTED = {   # manifest file -> (role, variant, base)
    "instantid_ip-adapter.bin": ("adapter", "instantid", "sdxl"),
    "instantid_controlnet_diffusion_pytorch_model.safetensors": ("controlnet", "diffusers", "sdxl"),
    "ip-adapter_sd15.bin": ("adapter", "base", "sd15"),
    "ip-adapter_sd15.safetensors": ("adapter", "base", "sd15"),
    "ip-adapter_sd15_light.bin": ("adapter", "light", "sd15"),
    "ip-adapter_sd15_light.safetensors": ("adapter", "light", "sd15"),
    "ip-adapter_sd15_light_v11.bin": ("adapter", "light", "sd15"),
    "ip-adapter_sd15_vit-G.bin": ("adapter", "base", "sd15"),
    "ip-adapter_sd15_vit-G.safetensors": ("adapter", "base", "sd15"),
    "ip-adapter-plus_sd15.bin": ("adapter", "plus", "sd15"),
    "ip-adapter-plus_sd15.safetensors": ("adapter", "plus", "sd15"),
    "ip-adapter-plus-face_sd15.bin": ("adapter", "plus_face", "sd15"),
    "ip-adapter-plus-face_sd15.safetensors": ("adapter", "plus_face", "sd15"),
    "ip-adapter-full-face_sd15.bin": ("adapter", "full_face", "sd15"),
    "ip-adapter-full-face_sd15.safetensors": ("adapter", "full_face", "sd15"),
    "ip-adapter_sdxl.bin": ("adapter", "base", "sdxl"),
    "ip-adapter_sdxl.safetensors": ("adapter", "base", "sdxl"),
    "ip-adapter_sdxl_vit-h.bin": ("adapter", "base", "sdxl"),
    "ip-adapter_sdxl_vit-h.safetensors": ("adapter", "base", "sdxl"),
    "ip-adapter-plus_sdxl_vit-h.bin": ("adapter", "plus", "sdxl"),
    "ip-adapter-plus_sdxl_vit-h.safetensors": ("adapter", "plus", "sdxl"),
    "ip-adapter-plus-face_sdxl_vit-h.bin": ("adapter", "plus_face", "sdxl"),
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": ("adapter", "plus_face", "sdxl"),
    "ip-adapter-faceid_sd15.bin": ("adapter", "faceid", "sd15"),
    "ip-adapter-faceid_sdxl.bin": ("adapter", "faceid", "sdxl"),
    "ip-adapter-faceid-plus_sd15.bin": ("adapter", "faceid_plus", "sd15"),
    "ip-adapter-faceid-plusv2_sd15.bin": ("adapter", "faceid_plusv2", "sd15"),
    "ip-adapter-faceid-plusv2_sdxl.bin": ("adapter", "faceid_plusv2", "sdxl"),
    "ip-adapter-faceid-portrait_sd15.bin": ("adapter", "faceid_portrait", "sd15"),
    "ip-adapter-faceid-portrait-v11_sd15.bin": ("adapter", "faceid_portrait", "sd15"),
    "ip-adapter-faceid-portrait_sdxl.bin": ("adapter", "faceid_portrait", "sdxl"),
    "ip-adapter-faceid-portrait_sdxl_unnorm.bin": ("adapter", "faceid_portrait_unnorm", "sdxl"),
    "ip-adapter-faceid_sd15_lora.safetensors": ("faceid_lora", "lora", "sd15"),
    "ip-adapter-faceid-plus_sd15_lora.safetensors": ("faceid_lora", "lora", "sd15"),
    "ip-adapter-faceid-plusv2_sd15_lora.safetensors": ("faceid_lora", "lora", "sd15"),
    "ip-adapter-faceid_sdxl_lora.safetensors": ("faceid_lora", "lora", "sdxl"),
    "ip-adapter-faceid-plusv2_sdxl_lora.safetensors": ("faceid_lora", "lora", "sdxl"),
    "pulid_v1.bin": ("pulid", "pulid_v1", "sdxl"),
    "pulid_v1.1.safetensors": ("pulid", "pulid_v1.1", "sdxl"),
    "ip-adapter_pulid_sdxl_fp16.safetensors": ("pulid", "pulid (sd-webui-controlnet repack)", "sdxl"),
    "clip_vit_h_image_encoder_model.safetensors": ("clip_vision", "ViT-H-14", "any"),
    "clip_vit_bigG_image_encoder_model.safetensors": ("clip_vision", "ViT-bigG-14", "any"),
}


def infos_of(name):
    m = load_manifest(name)
    sd = state_dict_from_manifest(m, device="meta")
    return m, {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in flatten(sd).items()}


def test_every_published_model_file_is_covered():
    tensor_manifests = {n[:-5] for n in manifest_names()
                        if load_manifest(n).get("container") != "onnx" and "tensors" in load_manifest(n)}
    assert tensor_manifests - set(EXPECTED) <= {"EVA02_CLIP_L_336_psz14_s6B.pt"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_role_and_variant_from_keys_and_shapes(name):
    m, infos = infos_of(name)
    d = classify(infos, m["file"])
    assert (d.role, d.variant, d.base) == EXPECTED[name]
    if d.role == "adapter":
        assert d.tokens == m["num_image_tokens"]


def test_renamed_files_are_still_recognised_by_content():
    _, infos = infos_of("instantid_ip-adapter.bin")
    assert classify(infos, "ip-adapter_instant_id_sdxl.bin").variant == "instantid"
    assert classify(infos, "my_face_model.bin").variant == "instantid"
    _, infos = infos_of("ip-adapter-plus_sd15.bin")
    assert classify(infos, "whatever.bin").variant == "plus"


def test_full_size_layer_maps_match_the_published_map():
    with open(os.path.join(os.path.dirname(__file__), "..", "lib_instantid", "manifests",
                           "unet_attn_layer_map.json")) as f:
        layer_map = json.load(f)
    for unet, kind in ((sdxl_full_meta(), "sdxl"), (sd15_full_meta(), "sd15")):
        layers = cross_attention_layers(unet)
        expected = [row for row in layer_map[kind] if row["attn"] == "attn2"]
        assert [l.path for l in layers] == [row["ldm"] for row in expected]
        assert [l.key for l in layers] == [row["processor_index"] for row in expected]
        assert [l.inner_dim for l in layers] == [row["inner_dim"] for row in expected]
        assert unet_family(unet).name == kind


def _unit_from_manifest(name):
    sd = state_dict_from_manifest(load_manifest(name), device="meta")
    ip = sd["ip_adapter"]
    n = len([k for k in ip if k.endswith("to_k_ip.weight")])
    weights = {k: (ip[f"{2 * k + 1}.to_k_ip.weight"], ip[f"{2 * k + 1}.to_v_ip.weight"]) for k in range(n)}
    return AttentionUnit(name, torch.zeros(2, 16, 2048, device="meta"), weights)


def test_full_size_instantid_adapter_fits_sdxl_and_is_refused_on_sd15():
    unit = _unit_from_manifest("instantid_ip-adapter.bin")
    _check_attention_unit(unit, cross_attention_layers(sdxl_full_meta()))
    with pytest.raises(InstantIDError, match="70 cross-attention layers.*16 cross-attention layers"):
        _check_attention_unit(unit, cross_attention_layers(sd15_full_meta()))


def test_full_size_identitynet_gives_one_residual_per_sdxl_input_block():
    from lib_instantid.identitynet import INSTANTID_CONFIG, IdentityNet
    with torch.device("meta"):
        net = IdentityNet(INSTANTID_CONFIG)
    assert len(net.controlnet_down_blocks) == len(sdxl_full_meta().input_blocks) == 9


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"x": Evil()}, "ip_adapter": {}}, str(path))
    with pytest.raises(ModelFileError, match="Refused to load 'ip-adapter.bin'"):
        load_file(str(path))
    with pytest.raises(ModelFileError, match="Refused"):
        read_tensor_infos(str(path))
    assert not marker.exists()
    found = scan([str(tmp_path)], {})
    assert found == []          # listed nowhere, never raised while listing


def test_reading_keys_is_cheap_and_legacy_pickles_are_deferred(tmp_path):
    sd = {"image_proj": {"proj.weight": torch.zeros(8, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(3, 768)}}
    torch.save(sd, str(tmp_path / "a.bin"))
    infos = read_tensor_infos(str(tmp_path / "a.bin"))
    assert infos["ip_adapter.1.to_k_ip.weight"].shape == (3, 768)
    torch.save(sd, str(tmp_path / "old.bin"), _use_new_zipfile_serialization=False)
    assert read_tensor_infos(str(tmp_path / "old.bin")) is None
    assert load_file(str(tmp_path / "old.bin"))["ip_adapter"]["1.to_k_ip.weight"].shape == (3, 768)


def _write(m, path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_model_file(load_manifest(m), path, **kw)


def test_files_are_found_where_users_keep_them(tmp_path):
    small = lambda key, shape: [min(s, 8) for s in shape]  # noqa: E731 - names and containers, tiny shapes
    models = tmp_path / "models"
    _write("instantid_ip-adapter.bin", str(models / "ControlNet" / "ip-adapter_instant_id_sdxl.bin"))
    _write("instantid_controlnet_diffusion_pytorch_model.safetensors",
           str(models / "ControlNet" / "control_instant_id_sdxl.safetensors"), shape_override=small)
    folder = models / "instantid" / "ControlNetModel"
    _write("instantid_controlnet_diffusion_pytorch_model.safetensors",
           str(folder / "diffusion_pytorch_model.safetensors"), shape_override=small)
    (folder / "config.json").write_text("{}")
    _write("ip-adapter_sd15.safetensors", str(models / "ipadapter" / "ip-adapter_sd15.safetensors"))
    (models / "ControlNet" / "notes.txt").write_text("not a model")
    (models / "ControlNet" / "broken.safetensors").write_bytes(b"\x00" * 20)
    locations = Locations([str(models / d) for d in ("instantid", "ipadapter", "ControlNet")],
                          [str(models / d) for d in ("instantid", "ControlNet")], [])
    found = list_models(locations, ModelCache())
    adapters = {e.name: e.detected for e in found["adapters"]}
    assert adapters["ip-adapter_instant_id_sdxl.bin"].variant == "instantid"
    assert adapters["ip-adapter_sd15.safetensors"].variant == "base"
    assert sorted(e.name for e in found["identitynets"]) == ["ControlNetModel", "control_instant_id_sdxl.safetensors"]
    picked = _pick(found["identitynets"], "", "IdentityNet", "", prefer=("instant",))
    assert picked.name == "control_instant_id_sdxl.safetensors"
    assert _pick(found["adapters"], "ip-adapter_sd15", "adapter", "").name == "ip-adapter_sd15.safetensors"
    with pytest.raises(ModelFileError, match="'nope' was not found. Available: "):
        _pick(found["adapters"], "nope", "adapter", "Put it in models/instantid.")


def test_the_wrong_file_as_adapter_gives_a_sentence(tmp_path):
    path = str(tmp_path / "control.safetensors")
    _write("instantid_controlnet_diffusion_pytorch_model.safetensors", path,
           shape_override=lambda k, s: [min(x, 8) for x in s])
    with pytest.raises(ModelFileError, match="not an IP-Adapter, FaceID or InstantID adapter file"):
        load_adapter(path)
    path = str(tmp_path / "ip-adapter_pulid_sdxl_fp16.safetensors")
    _write("ip-adapter_pulid_sdxl_fp16.safetensors", path)
    with pytest.raises(ModelFileError, match="PuLID is not supported yet"):
        load_adapter(path)
