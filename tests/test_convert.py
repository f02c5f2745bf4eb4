"""Training checkpoint -> published adapter conversion (lib_instantid.convert).

The training checkpoints are built at test time with the official naming: a wrapper module whose
attributes are registered as ``unet``, ``image_proj_model``, ``adapter_modules``, with
``adapter_modules = ModuleList(unet.attn_processors.values())`` after the training processors were
set on a diffusers ``UNet2DConditionModel`` (SD 1.5 / SDXL configs, meta device). Its state dict
gives every key name; the processor weights are created from the attention modules' own dims
(to_k_ip / to_v_ip: context -> inner; LoRA down/up) and must come out with the published shapes.
Values come from the manifest of the published file, so a converted file is compared with it
tensor by tensor. UNet weights other than the processors are stored as 1-element stand-ins:
the converter ignores them whatever their size.

Layouts: ``pytorch_model.bin`` (both names of every processor tensor, stored once) and
``model.safetensors`` (accelerate keeps only the first name of shared tensors: no
``adapter_modules.*``), optionally with a DDP ``module.`` prefix. SD 1.5 variants run at full
size with real files; SDXL variants are validated on the meta device at full size (a real full-size
SDXL round trip takes ~13 s on 2 CPU cores: same code path, left out).
"""

import json
import os
import subprocess
import sys
import zlib
from functools import lru_cache

import pytest
import torch
from torch import nn

from lib_instantid import convert_rules as rules
from lib_instantid.adapters import load_adapter
from lib_instantid.convert import Report, convert, convert_state_dict, main
from lib_instantid.errors import InputError
from lib_instantid.weights import flatten, load_file

from model_factory import adapter_parts, load_manifest, state_dict_from_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_CONFIGS = {
    "sd15": dict(cross_attention_dim=768),
    "sdxl": dict(block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
SD15_VARIANTS = {   # manifest -> (variant load_adapter reports, training dtype)
    "ip-adapter_sd15.bin": ("base", torch.float32),
    "ip-adapter-plus_sd15.bin": ("plus", torch.float16),
    "ip-adapter-full-face_sd15.bin": ("full_face", torch.float16),
    "ip-adapter-faceid_sd15.bin": ("faceid", torch.float16),
    "ip-adapter-faceid-plus_sd15.bin": ("faceid_plus", torch.float16),
}
SDXL_VARIANTS = {
    "ip-adapter_sdxl.bin": "base", "ip-adapter_sdxl_vit-h.safetensors": "base",
    "ip-adapter-plus_sdxl_vit-h.bin": "plus", "ip-adapter-plus-face_sdxl_vit-h.safetensors": "plus_face",
    "ip-adapter-faceid_sdxl.bin": "faceid", "ip-adapter-faceid-plusv2_sdxl.bin": "faceid_plusv2",
    "ip-adapter-faceid-portrait_sdxl.bin": "faceid_portrait", "instantid_ip-adapter.bin": "instantid",
}


# ----------------------------------------------------------------------------------------------
# Synthetic training checkpoints with the official naming
# ----------------------------------------------------------------------------------------------

_POOL_SIZE = 1 << 20
_POOL = (torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(0)) * 0.02).repeat(2)
_POOLS = {}


def _values(key, shape, dtype, device):
    """Deterministic per key and cheap at any size (a window of a random pool chosen by the key)."""
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    pool = _POOLS.setdefault(dtype, _POOL.to(dtype))
    n = 1
    for s in shape:
        n *= s
    start = zlib.crc32(key.encode()) % _POOL_SIZE
    window = pool[start:start + min(n, _POOL_SIZE)]
    flat = window.repeat(-(-n // _POOL_SIZE))[:n] if n > _POOL_SIZE else window.clone()
    return flat.reshape(shape)


@lru_cache(maxsize=4)
def published(manifest, device="cpu"):
    """{flat key: tensor} of a published file (manifest shapes and dtypes, deterministic values).

    Cached: callers must not modify it."""
    m = load_manifest(manifest)
    proj, ip = adapter_parts(state_dict_from_manifest(m, device="meta"))
    out = {}
    for part, sd in (("image_proj", proj), ("ip_adapter", ip)):
        for k, v in sd.items():
            out[f"{part}.{k}"] = _values(f"{part}.{k}", tuple(v.shape), v.dtype, device)
    return out


def same_values(a, b):
    """Equal ends of every tensor: each key has its own window of the pool, so a swapped or
    misplaced tensor differs there (full comparisons of ~100 M fp16 values are slow on CPUs)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return a.shape == b.shape and torch.equal(a[:2048], b[:2048]) and torch.equal(a[-2048:], b[-2048:])


class _LoRA(nn.Module):
    def __init__(self, dim_in, dim_out, rank):
        super().__init__()
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)


class _TrainingProcessor(nn.Module):
    """Parameters of the training processors: FaceID LoRA on every layer, to_k_ip/to_v_ip on attn2."""

    def __init__(self, attn, cross, lora_rank):
        super().__init__()
        inner, ctx = attn.to_q.out_features, attn.to_k.in_features
        if lora_rank:
            self.to_q_lora = _LoRA(attn.to_q.in_features, inner, lora_rank)
            self.to_k_lora = _LoRA(ctx, inner, lora_rank)
            self.to_v_lora = _LoRA(ctx, inner, lora_rank)
            self.to_out_lora = _LoRA(inner, attn.to_out[0].out_features, lora_rank)
        if cross:
            self.to_k_ip = nn.Linear(ctx, inner, bias=False)
            self.to_v_ip = nn.Linear(ctx, inner, bias=False)


def _module_with(tensors):
    """A module whose state dict has exactly these dotted names, in this order."""
    root = nn.Module()
    for key, t in tensors.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False))
    return root


@lru_cache(maxsize=None)
def _training_unet(base, lora_rank):
    """A meta diffusers UNet with the training processors set, as the training scripts do."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[base])
        procs = {}
        for name in unet.attn_processors:
            attn = unet.get_submodule(name[: -len(".processor")])
            procs[name] = _TrainingProcessor(attn, name.endswith("attn2.processor"), lora_rank)
        unet.set_attn_processor(procs)
    return unet


def _training_names(base, proj, lora_rank):
    """The training wrapper's state dict on the meta device: key -> shape, in registration order."""
    wrapper = nn.Module()
    wrapper.unet = _training_unet(base, lora_rank)
    wrapper.image_proj_model = _module_with(proj)
    wrapper.adapter_modules = nn.ModuleList(wrapper.unet.attn_processors.values())
    return {k: tuple(v.shape) for k, v in wrapper.state_dict().items()}


def training_state(manifest, layout="bin", prefix="", dtype=None, device="cpu"):
    """A training state dict (as saved) for the published file of ``manifest``, and that file's tensors.

    layout "bin": every name (pytorch_model.bin); "safetensors": accelerate's model.safetensors
    (the second name of each shared tensor dropped, so no adapter_modules.*).
    """
    m = load_manifest(manifest)
    pub = published(manifest, device)
    proj = {k[len("image_proj."):]: v for k, v in pub.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in pub.items() if k.startswith("ip_adapter.")}
    lora = next((v.shape[0] for k, v in ip.items() if k.endswith("to_q_lora.down.weight")), 0)
    names = _training_names(m["base_model"], proj, lora)
    # processor position = index in unet.attn_processors (diffusers is the oracle, not the layer map)
    index = {name[: -len(".processor")]: i
             for i, name in enumerate(_training_unet(m["base_model"], lora).attn_processors)}

    full = {}
    for key, shape in names.items():
        if key.startswith("image_proj_model."):
            t = proj[key.split(".", 1)[1]]
        elif key.startswith("adapter_modules."):
            t = ip[key.split(".", 1)[1]]
        elif ".processor." in key:
            path, param = key[len("unet."):].split(".processor.")
            t = ip[f"{index[path]}.{param}"]
        else:
            t = torch.zeros(1, device=device)   # a frozen UNet weight (ignored by the converter)
            shape = (1,)
        assert tuple(t.shape) == shape, (key, tuple(t.shape), shape)
        full[key] = t
    if dtype is not None:   # cast once per tensor, so both names still share it
        cast = {}
        for t in full.values():
            if id(t) not in cast:
                cast[id(t)] = t.to(dtype)
        full = {k: cast[id(t)] for k, t in full.items()}
    state, seen = {}, set()
    for key, t in full.items():
        if layout == "safetensors" and id(t) in seen:
            continue
        seen.add(id(t))
        state[prefix + key] = t
    return state, pub


def write_training(folder, state, layout):
    os.makedirs(folder, exist_ok=True)
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = os.path.join(folder, "model.safetensors")
        save_file(state, path, metadata={"format": "pt"})
    else:
        path = os.path.join(folder, "pytorch_model.bin")
        torch.save(state, path)
    return path


def manifest_specs(manifest):
    """{flat key: (shape, dtype)} of a manifest, in its order."""
    sd = flatten(state_dict_from_manifest(load_manifest(manifest), device="meta"))
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def safetensors_twin(manifest):
    """The manifest the .safetensors output must match: the published .safetensors, else the .bin."""
    twin = manifest.replace(".bin", ".safetensors")
    return twin if os.path.exists(os.path.join(rules.MANIFEST_DIR, twin + ".json")) else manifest


def assert_file_matches(path, manifest, pub):
    """Keys, order (.bin), shapes, dtypes of the manifest exactly; values those of the source."""
    specs = manifest_specs(manifest)
    data = load_file(path)
    if path.endswith(".bin"):
        assert list(data) == ["image_proj", "ip_adapter"]
        assert all(type(v) is dict for v in data.values())
        flat = flatten(data)
        assert list(flat) == list(specs)          # the published key order
    else:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        flat = data
        assert sorted(flat) == sorted(specs)
    for key, (shape, dtype) in specs.items():
        assert (tuple(flat[key].shape), flat[key].dtype) == (shape, dtype), key
        assert same_values(flat[key], pub[key].to(dtype)), key


# ----------------------------------------------------------------------------------------------
# Every variant converts to exactly the published layout and loads in the extension
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", list(SD15_VARIANTS))
def test_sd15_training_checkpoints_convert_and_load(manifest, tmp_path):
    variant, dtype = SD15_VARIANTS[manifest]
    stem = manifest.rsplit(".", 1)[0]

    # pytorch_model.bin: adapter_modules.* and their unet.*.processor.* aliases, as training saves them
    state, pub = training_state(manifest, "bin", dtype=dtype)
    assert any(k.startswith("adapter_modules.") for k in state)
    write_training(str(tmp_path / "checkpoint-100"), state, "bin")
    out = str(tmp_path / (stem + ".bin"))
    report = convert(str(tmp_path / "checkpoint-100"), out)
    assert report.ok and report.written == out, report.text()
    assert report.template == manifest and report.template_source == "built-in manifest"
    assert report.counts["rebuilt_from_unet"] == 0
    assert report.ignored["unet.down_blocks"] > 0 and "unet.*.processor (aliases of adapter_modules)" in report.ignored
    assert not (report.missing or report.unexpected or report.shape_mismatches or report.unknown)
    if dtype == torch.float32:
        assert report.cast == {"float32 -> float16": len(pub)}
    assert_file_matches(out, manifest, pub)
    loaded = load_adapter(out)
    assert (loaded.detected.variant, loaded.detected.base) == (variant, "sd15")
    assert len(loaded.ip) == 16 and (bool(loaded.lora) == variant.startswith("faceid"))

    # model.safetensors with a DDP prefix: no adapter_modules.* (accelerate dropped the aliases)
    state, _ = training_state(manifest, "safetensors", prefix="module.", dtype=dtype)
    assert not any(k.startswith("module.adapter_modules.") for k in state)
    src = write_training(str(tmp_path / "checkpoint-200"), state, "safetensors")
    out = str(tmp_path / (stem + ".safetensors"))
    report = convert(src, out)
    assert report.ok and report.written == out, report.text()
    assert report.counts["rebuilt_from_unet"] == report.counts["ip_adapter"] > 0
    assert report.prefixes_removed == ["module."]
    assert "rebuilt from unet.*.processor.*" in " ".join(report.layout)
    assert_file_matches(out, safetensors_twin(manifest), pub)
    loaded = load_adapter(out)
    assert (loaded.detected.variant, loaded.detected.base) == (variant, "sd15")


@pytest.mark.parametrize("manifest", list(SDXL_VARIANTS))
def test_sdxl_training_checkpoints_validate_at_full_size(manifest):
    """Full-size SDXL checkpoints on the meta device: mapped, validated and cast like the real ones."""
    fmt = "safetensors" if manifest.endswith(".safetensors") else "bin"
    for layout, prefix in (("bin", ""), ("safetensors", "module.")):
        state, _ = training_state(manifest, layout, prefix=prefix, dtype=torch.float32, device="meta")
        report, tensors = convert_state_dict(state, fmt=fmt, name=manifest)
        assert report.ok, report.text()
        assert report.template == manifest.rsplit(".json", 1)[0]
        assert (report.variant, report.base) == (SDXL_VARIANTS[manifest], "sdxl")
        specs = manifest_specs(manifest)
        assert list(tensors) == list(specs)
        assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == specs
        assert report.counts["rebuilt_from_unet"] == (report.counts["ip_adapter"] if layout == "safetensors" else 0)


# ----------------------------------------------------------------------------------------------
# Broken inputs: a precise report and nothing written
# ----------------------------------------------------------------------------------------------

BASE = "ip-adapter_sd15.bin"


@pytest.fixture(scope="module")
def base_state():
    return training_state(BASE, "bin")


def _without_layer(state, n, path):
    return {k: v for k, v in state.items()
            if not k.startswith(f"adapter_modules.{n}.") and f"{path}.processor." not in k}


def _replace(state, n, path, param, tensor):
    out = dict(state)
    out[f"adapter_modules.{n}.{param}"] = tensor
    out[f"unet.{path}.processor.{param}"] = tensor
    return out


def _refused(tmp_path, state, name="checkpoint"):
    src = write_training(str(tmp_path / name), state, "bin")
    out = tmp_path / "out" / "ip-adapter_sd15.bin"
    report = convert(src, str(out))
    assert not report.ok and report.written is None
    assert not out.exists() and not (tmp_path / "out").exists()
    assert "REFUSED; nothing written" in report.text()
    return report


def test_missing_layer_is_named(tmp_path, base_state):
    state, _ = base_state
    path = rules.layer_path("sd15", 5)
    assert path == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    report = _refused(tmp_path, _without_layer(state, 5, path))
    assert report.missing == ["ip_adapter.5.to_k_ip.weight", "ip_adapter.5.to_v_ip.weight"]
    assert report.missing_layers == [f"5 ({path}): to_k_ip.weight, to_v_ip.weight"]
    assert not (report.unexpected or report.shape_mismatches or report.unknown or report.problems)
    assert "ip_adapter.5.to_k_ip.weight" in report.text()


def test_wrong_shape_is_named(tmp_path, base_state):
    state, _ = base_state
    bad = torch.zeros(640, 768, dtype=torch.float16)
    report = _refused(tmp_path, _replace(state, 3, rules.layer_path("sd15", 3), "to_k_ip.weight", bad))
    assert report.shape_mismatches == [("ip_adapter.3.to_k_ip.weight", [640, 768], [320, 768])]
    assert not (report.missing or report.unexpected or report.unknown or report.problems)
    assert report.to_dict()["shape_mismatches"] == [
        {"key": "ip_adapter.3.to_k_ip.weight", "got": [640, 768], "expected": [320, 768]}]


def test_sd15_sdxl_layer_mix_is_named(tmp_path, base_state):
    state, _ = base_state
    for n in (1, 3):
        for param in ("to_k_ip.weight", "to_v_ip.weight"):
            state = _replace(state, n, rules.layer_path("sd15", n), param, torch.zeros(320, 2048, dtype=torch.float16))
    report = _refused(tmp_path, state)
    assert report.template == "ip-adapter_sd15.bin"
    assert len(report.problems) == 1
    assert "mix base models" in report.problems[0]
    assert "ip_adapter 1, 3 take 2048-wide context (SDXL)" in report.problems[0]
    assert "take 768-wide context (SD 1.5)" in report.problems[0]
    assert [m[0] for m in report.shape_mismatches] == [
        "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight",
        "ip_adapter.3.to_k_ip.weight", "ip_adapter.3.to_v_ip.weight"]


def test_sdxl_processor_path_in_an_sd15_checkpoint_is_named():
    state, _ = training_state(BASE, "safetensors", device="meta")
    xl_only = "down_blocks.1.attentions.0.transformer_blocks.1.attn2"    # SD 1.5 has one block there
    state[f"unet.{xl_only}.processor.to_k_ip.weight"] = torch.empty(640, 2048, device="meta")
    report, _ = convert_state_dict(state, name="x.bin")
    assert not report.ok
    assert any("mix the SD 1.5 and SDXL UNets" in p and xl_only in p for p in report.problems), report.problems
    assert report.unknown == [f"unet.{xl_only}.processor.to_k_ip.weight"]
    assert report.counts["rebuilt_from_unet"] == 32 and not report.missing


def test_sdxl_image_proj_with_sd15_layers_is_named():
    state, _ = training_state(BASE, "bin", device="meta")
    xl_proj, _ = training_state("ip-adapter_sdxl_vit-h.bin", "bin", device="meta")
    state = {k: v for k, v in state.items() if not k.startswith("image_proj_model.")}
    state.update({k: v for k, v in xl_proj.items() if k.startswith("image_proj_model.")})
    report, _ = convert_state_dict(state, name="x.bin")
    assert not report.ok
    assert "image_proj makes 2048-wide tokens (SDXL) but the attention layers take 768-wide context (SD 1.5)." \
        in report.problems
    assert ("image_proj.proj.weight", [8192, 1024], [3072, 1024]) in report.shape_mismatches


def test_architecture_without_a_published_file_needs_a_template():
    """Full-face exists for SD 1.5 only: an SDXL full-face checkpoint has no built-in template."""
    state, _ = training_state("ip-adapter_sdxl_vit-h.bin", "bin", device="meta")
    state = {k: v for k, v in state.items() if not k.startswith("image_proj_model.")}
    proj = {"proj.0.weight": (1280, 1280), "proj.0.bias": (1280,), "proj.2.weight": (2048, 1280),
            "proj.2.bias": (2048,), "proj.3.weight": (2048,), "proj.3.bias": (2048,)}
    state.update({f"image_proj_model.{k}": torch.empty(s, device="meta") for k, s in proj.items()})
    report, tensors = convert_state_dict(state, name="x.bin")
    assert (report.variant, report.base, report.template) == ("full_face", "sdxl", "")
    assert not report.ok and "No built-in template for a full_face adapter on SDXL" in report.problems[0]
    template = rules.Template("mine.bin", "file", {k: (tuple(v.shape), torch.float16) for k, v in tensors.items()})
    report, _ = convert_state_dict(state, template=template, name="x.bin")
    assert report.ok and report.cast == {"float32 -> float16": len(proj)}   # the layers are float16 already


def test_processor_index_beyond_the_unet_is_named():
    state, _ = training_state(BASE, "bin", device="meta")
    state["adapter_modules.33.to_k_ip.weight"] = torch.empty(320, 768, device="meta")
    report, _ = convert_state_dict(state, name="x.bin")
    assert report.unexpected == ["ip_adapter.33.to_k_ip.weight"]
    assert report.problems == ["Processor indices go up to 33, but the SD 1.5 UNet (context 768) has 32 "
                               "attention processors (0-31)."]


def test_unknown_key_is_refused_and_force_writes_with_report(tmp_path, base_state):
    state, pub = base_state
    state = dict(state, **{"text_encoder.embeddings.weight": torch.zeros(4)})
    report = _refused(tmp_path, state)
    assert report.unknown == ["text_encoder.embeddings.weight"]
    assert report.counts["unknown"] == 1 and not (report.missing or report.unexpected)
    assert "text_encoder.embeddings.weight" in report.text()

    out = str(tmp_path / "forced" / "ip-adapter_sd15.bin")
    report = convert(str(tmp_path / "checkpoint"), out, force=True)
    assert not report.ok and report.forced and report.written == out
    assert report.report_file == out + ".report.json"
    with open(report.report_file) as f:
        saved = json.load(f)
    assert saved["unknown"] == ["text_encoder.embeddings.weight"] and saved["written"] == out
    assert saved["ok"] is False
    assert_file_matches(out, BASE, pub)          # the unknown key is not carried over
    assert load_adapter(out).detected.variant == "base"


# ----------------------------------------------------------------------------------------------
# Inputs, templates, arguments
# ----------------------------------------------------------------------------------------------


def test_published_file_is_validated_and_resaved(tmp_path):
    pub = published("ip-adapter-plus_sd15.bin")
    src = str(tmp_path / "ip-adapter-plus_sd15.bin")
    torch.save({"image_proj": {k[11:]: v for k, v in pub.items() if k.startswith("image_proj.")},
                "ip_adapter": {k[11:]: v for k, v in pub.items() if k.startswith("ip_adapter.")}}, src)
    assert convert(src).ok        # no output: a check only
    out = str(tmp_path / "ip-adapter-plus_sd15.safetensors")
    report = convert(src, out)
    assert report.ok and report.layout == ["published layout (image_proj / ip_adapter)"]
    assert report.template == "ip-adapter-plus_sd15.safetensors"
    assert_file_matches(out, "ip-adapter-plus_sd15.safetensors", pub)
    with pytest.raises(InputError, match="is the input file"):
        convert(src, src)


def test_template_from_a_published_file_and_by_name(tmp_path, base_state):
    state, pub = base_state
    src = write_training(str(tmp_path / "ck"), state, "bin")
    ref = str(tmp_path / "ref.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in pub.items()}, ref)
    report = convert(src, str(tmp_path / "a.bin"), template=ref)
    assert report.ok and (report.template, report.template_source) == ("ref.safetensors", "file")
    assert list(flatten(load_file(str(tmp_path / "a.bin")))) == list(manifest_specs(BASE))   # module order kept

    for name in ("ip-adapter_sd15", "ip-adapter_sd15.bin", "ip-adapter_sd15.bin.json"):
        report, _ = convert_state_dict(state, template=name)
        assert report.ok and report.template == "ip-adapter_sd15.bin"
    report, _ = convert_state_dict(state, template=os.path.join(rules.MANIFEST_DIR, "ip-adapter_sd15.bin.json"))
    assert report.ok and (report.template, report.template_source) == ("ip-adapter_sd15.bin", "manifest file")
    report, _ = convert_state_dict(state, template="ip-adapter_sd15", fmt="safetensors")
    assert report.template == "ip-adapter_sd15.safetensors"

    report, _ = convert_state_dict(state, template="ip-adapter-plus_sd15")   # the wrong family
    assert not report.ok and "image_proj.latents" in report.missing and "image_proj.proj.weight" in report.unexpected
    with pytest.raises(InputError, match="Did you mean"):
        convert_state_dict(state, template="ip-adapter_sd16")


def test_sharded_checkpoint_folder(tmp_path, base_state):
    state, pub = base_state
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    from safetensors.torch import save_file
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    seen, weight_map = set(), {}
    for shard, names in shards.items():
        part = {}
        for k in names:
            if id(state[k]) not in seen:
                seen.add(id(state[k]))
                part[k] = state[k].contiguous()
                weight_map[k] = shard
        save_file(part, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = convert(str(folder), str(tmp_path / "ip-adapter_sd15.bin"))
    assert report.ok, report.text()
    assert len(report.input_files) == 2
    assert_file_matches(str(tmp_path / "ip-adapter_sd15.bin"), BASE, pub)


def test_wrapped_state_dict_file(tmp_path, base_state):
    """A checkpoint saved as {"state_dict": ..., "global_step": ...} (Lightning-style scripts)."""
    state, pub = base_state
    src = str(tmp_path / "last.ckpt.pt")
    torch.save({"state_dict": state, "global_step": torch.tensor(100)}, src)
    report = convert(src, str(tmp_path / "ip-adapter_sd15.safetensors"))
    assert report.ok, report.text()
    assert_file_matches(str(tmp_path / "ip-adapter_sd15.safetensors"), "ip-adapter_sd15.safetensors", pub)


def test_bad_arguments(tmp_path, base_state):
    src = write_training(str(tmp_path / "ck"), base_state[0], "bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an accelerate checkpoint folder"):
        convert(str(tmp_path / "empty"), str(tmp_path / "o.bin"))
    with pytest.raises(InputError, match="Input not found"):
        convert(str(tmp_path / "nope"), str(tmp_path / "o.bin"))
    with pytest.raises(InputError, match="does not match the output name"):
        convert(src, str(tmp_path / "o.bin"), fmt="safetensors")
    with pytest.raises(InputError, match="must end in .safetensors or .bin"):
        convert(src, str(tmp_path / "o.ckpt2"))
    with pytest.raises(InputError, match="is the input file"):
        convert(src, src)
    (tmp_path / "folder.bin").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        convert(src, str(tmp_path / "folder.bin"))


def test_report_dict_is_json(base_state):
    report, _ = convert_state_dict(base_state[0], name="x.bin")
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == set(Report.__dataclass_fields__)
    assert d["ok"] is True and d["template"] == "ip-adapter_sd15.bin" and d["ignored"]["unet.up_blocks"] > 0
    assert sum(d["ignored"].values()) == d["counts"]["ignored"] < d["counts"]["input_keys"]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_cli(tmp_path, base_state, capsys):
    state, _ = base_state
    good = write_training(str(tmp_path / "good"), state, "bin")
    bad = write_training(str(tmp_path / "bad"), _without_layer(state, 5, rules.layer_path("sd15", 5)), "bin")

    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "lib_instantid.convert", str(tmp_path / "good"),
                          str(tmp_path / "o.safetensors")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr
    assert "Template: ip-adapter_sd15.safetensors (built-in manifest)" in run.stdout
    assert "Result: OK; written to" in run.stdout and os.path.isfile(tmp_path / "o.safetensors")

    run = subprocess.run([sys.executable, "-m", "lib_instantid.convert", bad, str(tmp_path / "b.bin")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 1
    assert "ip_adapter.5.to_k_ip.weight" in run.stdout and "REFUSED" in run.stdout
    assert not os.path.exists(tmp_path / "b.bin")

    assert main([bad, str(tmp_path / "b.bin"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["missing"] == ["ip_adapter.5.to_k_ip.weight",
                                                              "ip_adapter.5.to_v_ip.weight"]
    assert main([bad, str(tmp_path / "f.bin"), "--force"]) == 0
    assert os.path.isfile(tmp_path / "f.bin") and os.path.isfile(str(tmp_path / "f.bin") + ".report.json")
    capsys.readouterr()
    assert main([good]) == 0 and "check only" in capsys.readouterr().out
    assert main([good, str(tmp_path / "o.bin"), "--format", "safetensors"]) == 2
    assert main([good, str(tmp_path / "o.bin"), "--template", "nonsense"]) == 2
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--format", "zip", good])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "adapter_modules" in capsys.readouterr().out
