"""Weight types (ComfyUI_IPAdapter_plus presets) on the full SD 1.5 / SDXL topologies.

Expected values are written out per block from the preset rules (w = weight, wc = composition
weight): SD 1.5 blocks 0-5 = input blocks 1, 2, 4, 5, 7, 8; 6 = middle; 7-15 = output blocks 3-11.
SDXL blocks 0, 1 = input 4, 5; 2, 3 = input 7, 8; 4 = middle; 5-7 = output 0-2; 8-10 = output 3-5.
"""

import pytest

from lib_instantid.errors import InputError
from lib_instantid.unet_layers import cross_attention_layers
from lib_instantid.weight_types import WEIGHT_TYPES, block_indices, layer_weights

from unets import sd15_full_meta, sd15_like, sdxl_full_meta, sdxl_like

W, WC = 0.8, 0.5

SD15_BLOCKS = ([f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block"]
               + [f"output_blocks.{i}" for i in range(3, 12)])
SDXL_BLOCKS = ([f"input_blocks.{i}" for i in (4, 5, 7, 8)] + ["middle_block"]
               + [f"output_blocks.{i}" for i in range(6)])
SDXL_LAYERS_PER_BLOCK = [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]
SD15_PARTS = ["input"] * 6 + ["middle"] + ["output"] * 9
SDXL_PARTS = ["input"] * 4 + ["middle"] + ["output"] * 6


def expected_blocks(kind, sdxl):
    n = 11 if sdxl else 16
    parts = SDXL_PARTS if sdxl else SD15_PARTS
    smooth = {
        "linear": lambda t: W,
        "ease in": lambda t: W * (0.05 + 0.95 * (1 - t / n)),
        "ease out": lambda t: W * (0.05 + 0.95 * t / n),
        "ease in-out": lambda t: W * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))),
        "reverse in-out": lambda t: W * (0.05 + 0.95 * abs(t - n / 2) / (n / 2)),
        "weak input": lambda t: 0.2 * W if parts[t] == "input" else W,
        "weak middle": lambda t: 0.2 * W if parts[t] == "middle" else W,
        "weak output": lambda t: 0.2 * W if parts[t] == "output" else W,
        "strong middle": lambda t: W if parts[t] == "middle" else 0.2 * W,
    }
    if kind in smooth:
        return [smooth[kind](t) for t in range(n)]
    if sdxl:
        table = {
            "style transfer": {6: W},
            "composition": {3: W},
            "strong style transfer": {t: W for t in range(11) if t != 3},
            "style and composition": {3: WC, 6: W},
            "strong style and composition": {**{t: W for t in range(11)}, 3: WC},
        }[kind]
    else:
        style = {t: W for t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
        table = {
            "style transfer": style,
            "composition": {4: 0.25 * W, 5: W},
            "strong style transfer": {t: W for t in range(16) if t not in (4, 5)},
            "style and composition": {**style, 4: 0.25 * WC, 5: WC},
            "strong style and composition": {**{t: W for t in range(16)}, 4: WC, 5: WC},
        }[kind]
    return [table.get(t, 0.0) for t in range(n)]


@pytest.fixture(scope="module")
def full_layers():
    return {"sd15": cross_attention_layers(sd15_full_meta()), "sdxl": cross_attention_layers(sdxl_full_meta())}


def _block_prefix(path):
    parts = path.split(".")
    return parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_block_index_of_every_layer(full_layers, family):
    layers = full_layers[family]
    names = SDXL_BLOCKS if family == "sdxl" else SD15_BLOCKS
    t_of = block_indices(layers)
    assert len(t_of) == len(layers) == (70 if family == "sdxl" else 16)
    for layer in layers:
        assert names[t_of[layer.index]] == _block_prefix(layer.path), layer.path
    counts = [t_of.count(t) for t in range(len(names))]
    assert counts == (SDXL_LAYERS_PER_BLOCK if family == "sdxl" else [1] * 16)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", WEIGHT_TYPES)
def test_every_weight_type_per_block(full_layers, family, kind):
    layers = full_layers[family]
    weights = layer_weights(layers, kind, W, WC)
    assert len(weights) == len(layers)
    t_of = block_indices(layers)
    expected = expected_blocks(kind, family == "sdxl")
    for layer in layers:
        assert weights[layer.index] == pytest.approx(expected[t_of[layer.index]], abs=1e-12), \
            (kind, layer.path)


def test_sdxl_style_transfer_is_output_block_1_only(full_layers):
    layers = full_layers["sdxl"]
    weights = layer_weights(layers, "style transfer", W)
    on = [l.path for l in layers if weights[l.index]]
    assert len(on) == 10 and all(p.startswith("output_blocks.1.1.") for p in on)
    assert set(weights) == {0.0, W}


def test_sd15_composition_uses_the_weight_not_the_composition_weight(full_layers):
    layers = full_layers["sd15"]
    weights = layer_weights(layers, "composition", W, composition_weight=3.0)
    by_path = {l.path.split(".transformer_blocks")[0]: weights[l.index] for l in layers}
    assert by_path["input_blocks.7.1"] == pytest.approx(0.25 * W)
    assert by_path["input_blocks.8.1"] == pytest.approx(W)
    assert sum(1 for v in weights if v) == 2


def test_reduced_test_unets_have_the_same_blocks():
    sd15 = block_indices(cross_attention_layers(sd15_like(width=32)))
    assert sd15 == list(range(16))[:6] + list(range(7, 16)) + [6]   # adapter order puts the middle last
    xl_layers = cross_attention_layers(sdxl_like(depth=1))
    xl = block_indices(xl_layers)
    assert sorted(xl) == list(range(11))
    assert layer_weights(xl_layers, "style transfer", W) == [W if t == 6 else 0.0 for t in xl]


def test_case_and_spaces_are_ignored(full_layers):
    layers = full_layers["sd15"]
    assert layer_weights(layers, "  Ease  In-Out ", W) == layer_weights(layers, "ease in-out", W)


def test_unknown_weight_type_names_the_field_and_the_choices(full_layers):
    with pytest.raises(InputError) as err:
        layer_weights(full_layers["sdxl"], "style transfer precise", W)
    message = str(err.value)
    assert "'weight_type'" in message and "style transfer precise" in message
    assert all(name in message for name in WEIGHT_TYPES)
