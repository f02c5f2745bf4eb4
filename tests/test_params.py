"""Request parsing (UI positional list, API dicts) and the infotext round trip."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from lib_instantid import infotext
from lib_instantid.errors import InputError
from lib_instantid.params import UI_ORDER, UnitParams, parse_args


def b64(shape=(8, 8, 3)):
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 200, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_ui_positional_values():
    values = {n: getattr(UnitParams(), n) for n in UI_ORDER}
    values.update(image=np.zeros((4, 4, 3), np.uint8), weight=1.2, face="1")
    req = parse_args([True] + [values[n] for n in UI_ORDER])
    assert req.enabled and len(req.active_units) == 1
    unit = req.active_units[0]
    assert unit.weight == 1.2 and unit.face == "1" and unit.image.shape == (4, 4, 3)
    assert not parse_args([False] + [values[n] for n in UI_ORDER]).active_units
    assert parse_args([True] + [values[n] for n in UI_ORDER]).units[0].adapter == ""


def test_api_dict_single_unit_and_units():
    req = parse_args([{"enabled": True, "image": b64(), "images": [b64(), "data:image/png;base64," + b64()],
                       "weight": 0.5, "face": 2}])
    unit = req.active_units[0]
    assert len(unit.all_images) == 3 and unit.weight == 0.5 and unit.face == "2"
    assert unit.identitynet_strength == 0.8          # the documented default
    req = parse_args([{"enabled": True, "units": [{"image": b64()}, {"image": b64(), "enabled": False}]}])
    assert len(req.units) == 2 and len(req.active_units) == 1
    assert parse_args([{"image": b64()}]).active_units == []   # "enabled" defaults to false, like the UI
    assert parse_args([{"enabled": False, "weight": "x"}]).active_units == []   # a disabled panel never fails


@pytest.mark.parametrize("args,message", [
    ([{"enabled": True, "weight": "x"}], "Field 'weight' must be a number"),
    ([{"enabled": True, "weight": 9}], "Field 'weight' must be between -1.0 and 3.0"),
    ([{"enabled": True, "start": 0.7, "end": 0.2}], "Field 'start' (0.7) must not be after 'end' (0.2)"),
    ([{"enabled": True, "wieght": 1}], "Unknown field 'wieght'"),
    ([{"enabled": True, "image": "@@@"}], "Field 'image' is not a readable image"),
    ([{"enabled": True, "images": ["@@@"]}], "Field 'images[0]' is not a readable image"),
    ([{"enabled": True, "face": -1}], "Field 'face' must be 0 or more"),
    ([{"enabled": True, "hires_adapter": "maybe"}], "Field 'hires_adapter' must be true or false"),
    ([{"enabled": "yes please"}], "Field 'enabled' must be true or false"),
    ([{"enabled": True, "units": [{"weight": "x"}]}], "Field 'units[0].weight' must be a number"),
    ([{"enabled": True, "units": [{}], "weight": 1}], "Unknown field 'weight' next to 'units'"),
    ([{"enabled": True, "units": "all"}], "Field 'units' must be a list"),
])
def test_invalid_input_names_the_field(args, message):
    with pytest.raises(InputError) as err:
        parse_args(args)
    assert message in str(err.value)


def test_infotext_round_trip():
    unit = UnitParams(weight=0.65, start=0.1, end=0.9, identitynet_strength=1.1, face="2", hires_identitynet=False)
    text = infotext.format_unit(unit, "ip-adapter.bin", "ControlNetModel", 3)
    assert "," not in text and ":" not in text      # stays one readable infotext value
    back = infotext.parse_unit(text)
    assert back["weight"] == 0.65 and back["identitynet_strength"] == 1.1 and back["face"] == "2"
    assert back["hires_identitynet"] is False and back["adapter"] == "ip-adapter.bin"
    assert infotext.units_in({"InstantID": text, "Steps": "20"})[0] == back
    assert infotext.units_in({"InstantID unit 1": text, "InstantID unit 2": text}) == [back, back]
    assert infotext.parse_unit("weight=heavy; nonsense; end=0.5") == {"end": 0.5}


def test_panel_units_without_a_photo_are_not_in_use_when_another_has_one():
    unit = {n: getattr(UnitParams(), n) for n in UI_ORDER}
    with_photo = dict(unit, image=np.zeros((4, 4, 3), np.uint8))
    req = parse_args([True] + [unit[n] for n in UI_ORDER] + [with_photo[n] for n in UI_ORDER])
    assert len(req.active_units) == 1 and req.active_units[0].image is not None
    req = parse_args([True] + [unit[n] for n in UI_ORDER] + [unit[n] for n in UI_ORDER])
    assert len(req.active_units) == 2          # nothing anywhere: the generation will say what is missing


def test_documented_defaults_are_the_defaults():
    from lib_instantid.params import UNIT_FIELDS
    unit = UnitParams()
    for f in UNIT_FIELDS:
        assert getattr(unit, f.name) == f.default, f.name
    assert [f.name for f in UNIT_FIELDS] == UI_ORDER
