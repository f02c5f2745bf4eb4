"""The webui glue: UI build (gradio 3.41), settings, XYZ axes, infotext paste-back, API args."""

import types

import pytest
import torch

gr = pytest.importorskip("gradio")


def test_ui_builds_and_defaults_are_a_disabled_panel(webui, script_module):
    from modules import scripts
    script = script_module.InstantIDScript()
    runner = scripts.ScriptRunner([script])
    with gr.Blocks():
        runner.setup_ui(is_img2img=False)
    defaults = runner.default_args()[script.args_from:script.args_to]
    from lib_instantid.params import parse_args
    assert defaults[0] is False and parse_args(defaults).active_units == []
    req = parse_args([True] + defaults[1:])
    assert req.units[0].weight == 0.8 and req.units[0].identitynet_strength == 0.8
    assert req.units[0].adapter == "ip-adapter.bin" and req.units[0].identitynet == "ControlNetModel"
    assert script.title() == "InstantID" and script.show(False) is scripts.AlwaysVisible


def test_infotext_is_pasted_back_into_the_panel(webui, script_module):
    from modules import scripts
    script = script_module.InstantIDScript()
    with gr.Blocks():
        scripts.ScriptRunner([script]).setup_ui(is_img2img=True)
    params = {"InstantID": "adapter=ip-adapter.bin; identitynet=ControlNetModel; weight=0.65; start=0.0; end=1.0; "
                           "identitynet_strength=1.1; identitynet_start=0.0; identitynet_end=0.9; face=1; "
                           "hires_adapter=True; hires_identitynet=False; images=1"}
    pasted = {comp.elem_id: getter(params) for comp, getter in script.infotext_fields}
    eid = script.elem_id
    assert pasted[eid("enabled") + "-checkbox"] is True   # InputAccordion ids its checkbox so
    assert pasted[eid("weight")] == 0.65 and pasted[eid("identitynet_end")] == 0.9
    assert pasted[eid("face")] == "1" and pasted[eid("hires_identitynet")] is False
    nothing = {comp.elem_id: getter({"Steps": "20"}) for comp, getter in script.infotext_fields}
    assert nothing[eid("enabled") + "-checkbox"] is False


def test_settings_are_registered(webui, script_module):
    from modules import shared
    script_module.on_ui_settings()
    assert shared.opts.instantid_face_device == "CPU"
    assert shared.opts.instantid_keep_models is True
    assert script_module.face_device() == "cpu"


def test_xyz_axes_override_the_panel(webui, script_module):
    from modules import scripts

    class AxisOption:
        def __init__(self, label, type, apply, **kw):
            self.label, self.type, self.apply = label, type, apply

    xyz = types.SimpleNamespace(axis_options=[], AxisOption=AxisOption,
                                apply_field=lambda field: (lambda p, x, xs: setattr(p, field, x)))
    cls = type("Script", (), {"__module__": "xyz_grid.py"})
    scripts.scripts_data.append(scripts.ScriptClassData(cls, "xyz_grid.py", "", xyz))
    try:
        script_module.on_before_ui()
    finally:
        scripts.scripts_data.pop()
    labels = [a.label for a in xyz.axis_options]
    assert "[InstantID] Adapter weight" in labels and "[InstantID] IdentityNet strength" in labels
    p = types.SimpleNamespace()
    next(a for a in xyz.axis_options if a.label == "[InstantID] Adapter weight").apply(p, 1.3, [])
    from lib_instantid.params import Request, UnitParams
    req = Request(True, [UnitParams()])
    script_module.apply_overrides(p, req)
    assert req.units[0].weight == 1.3


def test_routes_are_registered_on_app_start(webui, script_module):
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()
    script_module.on_app_started(None, app)
    paths = {r.path for r in app.routes}
    assert {"/instantid/v1/models", "/instantid/v1/detect", "/instantid/v1/unload"} <= paths


def test_fp8_unet_weights_compute_in_fp16(webui, script_module, monkeypatch):
    from modules import devices
    monkeypatch.setattr(devices, "dtype_unet", getattr(torch, "float8_e4m3fn", torch.float16))
    assert script_module.compute_dtype() == torch.float16


def test_detect_button_shows_boxes_and_keypoints(webui, script_module, astronaut):
    from face_pack import ASTRONAUT_BOX
    picture, message = script_module.preview_image(astronaut, None, "largest")
    assert picture.shape == (512, 1024, 3) and "1 face(s) found" in message
    x0, y0 = ASTRONAUT_BOX[:2].astype(int)
    assert tuple(picture[y0, x0 + 5]) == (0, 255, 0)                  # the chosen face's green box
    assert tuple(picture[0, 512 + 5]) == (0, 0, 0)                    # the keypoint map beside it
    assert script_module.preview_image(None, None, "largest") == (None, "Drop a face photo first.")
    _, message = script_module.preview_image(astronaut, None, "3")
    assert message.startswith("Face number 3 was requested but the reference image has 1 face(s)")
    assert script_module.free_models() == "InstantID models were freed."


def test_converter_section(webui, script_module, tmp_path, models_path):
    from model_factory import load_manifest, state_dict_from_manifest
    message = script_module.run_converter(str(tmp_path / "missing"), "x.bin", "auto", False)
    assert message.startswith("Input not found:") and "Give a training checkpoint folder or a weights file" in message
    sd = state_dict_from_manifest(load_manifest("ip-adapter_sd15.bin"))
    training = {f"image_proj_model.{k}": v for k, v in sd["image_proj"].items()}
    training.update({f"adapter_modules.{k}": v for k, v in sd["ip_adapter"].items()})
    torch.save(training, str(tmp_path / "pytorch_model.bin"))
    text = script_module.run_converter(str(tmp_path / "pytorch_model.bin"), "trained.bin", "auto", False)
    written = models_path / "ipadapter" / "trained.bin"
    assert written.is_file() and str(written) in text
    written.unlink()


def test_model_picker_line_says_what_a_file_is_and_needs(webui, script_module):
    line = script_module.describe_model("ip-adapter-plus_sd15.safetensors")
    assert "plus" in line and "SD 1.5" in line and "16 tokens" in line
    assert "encoder: CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in line
    line = script_module.describe_model("ip-adapter.bin")
    assert "instantid" in line and "SDXL" in line and "IdentityNet" in line
    assert "buffalo_l" in script_module.describe_model("ip-adapter-faceid_sd15.bin")
    assert script_module.describe_model("nothing.bin") == ""
