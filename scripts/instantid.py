"""InstantID for the AUTOMATIC1111 webui: the always-on script, its settings, routes and XYZ axes.

Thin glue: everything that does work lives in ``lib_instantid``. The webui catches and only logs
exceptions raised by script hooks, so ``process()`` keeps any error and the ``p.sample`` wrapper
raises it: the user sees the message instead of getting an image without InstantID.
"""

import logging
import os

import gradio as gr
import torch

from modules import devices, paths_internal, script_callbacks, scripts, shared

import lib_instantid  # noqa: F401  (import while the extension folder is on sys.path)
from lib_instantid import api, infotext, ui
from lib_instantid import params as P
from lib_instantid.errors import InstantIDError
from lib_instantid.model_cache import CACHE
from lib_instantid.pipeline import (default_locations, describe_entry, list_models, prepare, preview,
                                    preview_picture)

log = logging.getLogger("instantid")
PATCH_ATTR = "_instantid_patch"
XYZ_FIELDS = {"weight": "instantid_weight", "identitynet_strength": "instantid_identitynet_strength",
              "start": "instantid_start", "end": "instantid_end"}


# -- where things are ----------------------------------------------------------------------------

def locations():
    opts, cmd = shared.opts, shared.cmd_opts
    extra = [getattr(opts, "control_net_models_path", ""), getattr(cmd, "controlnet_dir", None),
             getattr(opts, "instantid_extra_path", "")]
    annotator = (getattr(opts, "control_net_modules_path", "") or getattr(cmd, "controlnet_annotator_models_path", None)
                 or os.path.join(paths_internal.extensions_dir, "sd-webui-controlnet", "annotator", "downloads"))
    return default_locations(paths_internal.models_path, [d for d in extra if d], annotator)


def face_device():
    wanted = getattr(shared.opts, "instantid_face_device", "CPU")
    return "cuda" if wanted == "CUDA" and getattr(devices.device, "type", "cpu") == "cuda" else "cpu"


def compute_dtype():
    """The UNet's dtype, or fp16 when the webui stores UNet weights in fp8."""
    dtype = devices.dtype_unet
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def model_choices():
    """(adapters, identitynets, encoders) names for the dropdowns."""
    try:
        found = list_models(locations(), CACHE)
    except Exception as exc:  # a listing problem must never break the UI
        log.warning("InstantID: could not list models: %s", exc)
        return [], [], []
    adapters = sorted((e for e in found["adapters"]), key=lambda e: (e.detected.variant != "instantid", e.name))
    return ([e.name for e in adapters], [e.name for e in found["identitynets"] if e.detected.base == "sdxl"],
            [e.name for e in found["encoders"]])


def refresh_choices():
    adapters, identitynets, encoders = model_choices()
    return (gr.update(choices=adapters), gr.update(choices=identitynets), gr.update(choices=["auto"] + encoders))


def describe_model(name):
    """The detected variant of the chosen file, and what it needs."""
    try:
        found = list_models(locations(), CACHE)
    except Exception:
        return ""
    entry = next((e for e in found["adapters"] if e.name == name), None)
    return describe_entry(entry, found["encoders"]) if entry else ""


def convert_output_dir():
    return os.path.join(paths_internal.models_path, "ipadapter")


def convert_templates():
    from lib_instantid.convert_rules import template_names
    return template_names()


def run_converter(source, output, template, force):
    """The converter section's button: the report as text (the file is written only if it validates)."""
    try:
        payload = {"input": source or "", "output": output or None, "force": bool(force),
                   "template": None if template in (None, "", "auto") else template}
        return api.convert_request(payload, convert_output_dir()).text()
    except InstantIDError as exc:
        return str(exc)


def unit_count():
    return max(1, min(int(getattr(shared.opts, "instantid_units", 3) or 3), 8))


# -- per generation ------------------------------------------------------------------------------

def on_cfg_denoiser(params):
    """Every CFG step: tell the active patch where this step's cond and uncond rows are."""
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    patch = getattr(p, PATCH_ATTR, None)
    if patch is None:
        return
    patch.begin_pass(getattr(p, "is_hr_pass", False))
    patch.begin_step(params.x, params.text_cond.shape[0], params.sampling_step,
                     params.total_sampling_steps, denoiser.inner_model)


def wrap_sample(p, prepared, error):
    original = p.sample

    def sample(*args, **kwargs):
        if error is not None:
            raise error
        patch = prepared.patch(p.sd_model.model.diffusion_model)
        setattr(p, PATCH_ATTR, patch)
        done = False
        try:
            with patch:
                result = original(*args, **kwargs)
            done = True
            return result
        finally:
            setattr(p, PATCH_ATTR, None)
            last_batch = getattr(p, "iteration", 0) >= getattr(p, "n_iter", 1) - 1
            if not getattr(shared.opts, "instantid_keep_models", True) and (last_batch or not done):
                free_models()

    p.sample = sample


def apply_overrides(p, request):
    """Values set by the XYZ plot (``p.instantid_<field>``) replace the panel's."""
    for field, attr in XYZ_FIELDS.items():
        value = getattr(p, attr, None)
        if value is not None:
            for unit in request.units:
                setattr(unit, field, float(value))


def describe(exc):
    if isinstance(exc, InstantIDError):
        return exc
    log.exception("InstantID failed")
    return InstantIDError(f"InstantID failed: {type(exc).__name__}: {exc}. See the console for details.")


# -- UI ------------------------------------------------------------------------------------------

def preview_image(image, pose, face):
    """The "Detect face" button: boxes on the photo and the keypoint map that will be used."""
    try:
        img = P.decode_image(image, "face photo")
        if img is None:
            return None, "Drop a face photo first."
        mode = P.convert(P.FIELDS_BY_NAME["face"], face, "")
        faces, chosen = preview(img, locations(), face_device(), mode)
        if chosen is None:
            return None, "No face was detected in the photo."
        pose_img, pose_face = P.decode_image(pose, "pose photo"), None
        if pose_img is not None:
            pose_face = preview(pose_img, locations(), face_device(), "largest")[1]
            if pose_face is None:
                return None, "No face was detected in the pose photo."
        picture = preview_picture(img, faces, chosen, pose_img, pose_face)
        return picture, f"{len(faces)} face(s) found; the green one is used."
    except InstantIDError as exc:
        return None, str(exc)


def free_models():
    CACHE.clear()
    devices.torch_gc()
    return "InstantID models were freed."


def infotext_fields_for(enabled, units):
    """Paste-back: the i-th unit found in the infotext fills the i-th unit of the panel."""
    def getter(i, name):
        def get(params):
            found = infotext.units_in(params)
            if i < len(found):
                return found[i].get(name, gr.update())
            return False if name == "enabled" else gr.update()
        return get

    fields = [(enabled, lambda params: bool(infotext.units_in(params)))]
    for i, components in enumerate(units):
        fields.append((components["enabled"], lambda params, i=i: i < len(infotext.units_in(params))))
        for name in infotext.SAVED:
            if name in components:
                fields.append((components[name], getter(i, name)))
    return fields


class InstantIDScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return "InstantID"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion, ToolButton

        adapters, identitynets, encoders = model_choices()
        units = []
        with InputAccordion(False, label="InstantID", elem_id=self.elem_id("enabled")) as enabled:
            with gr.Tabs():
                for i in range(unit_count()):
                    with gr.Tab(f"Unit {i + 1}"):
                        units.append(ui.unit_ui(i, adapters, identitynets, encoders,
                                                lambda name, i=i: self.elem_id(f"{name}" if i == 0 else f"u{i}_{name}")))
            with gr.Row():
                message = gr.Markdown("", elem_id=self.elem_id("message"))
                free = ToolButton("\U0001f5d1\ufe0f", elem_id=self.elem_id("free"))
            tools = ui.converter_ui(convert_templates(), self.elem_id)
        tools["run"].click(run_converter, inputs=[tools["input"], tools["output"], tools["template"], tools["force"]],
                           outputs=[tools["report"]])
        free.click(free_models, inputs=[], outputs=[message])
        for c in units:
            c["detect"].click(preview_image, inputs=[c["image"], c["pose_image"], c["face"]],
                              outputs=[c["preview"], c["info"]])
            c["adapter"].change(describe_model, inputs=[c["adapter"]], outputs=[c["info"]])
            c["refresh"].click(refresh_choices, inputs=[], outputs=[c["adapter"], c["identitynet"], c["encoder"]])
        self.infotext_fields = infotext_fields_for(enabled, units)
        self.paste_field_names = []
        return [enabled] + [comp for c in units for comp in ui.positional(c)]

    def process(self, p, *args):
        setattr(p, PATCH_ATTR, None)
        prepared, error = None, None
        try:
            request = P.parse_args(args)
            apply_overrides(p, request)
            if not request.active_units:
                return
            prepared = prepare(request, locations(), p.sd_model.model.diffusion_model, device=devices.device,
                               dtype=compute_dtype(), face_device=face_device())
            p.extra_generation_params.update(prepared.infotext)
        except Exception as exc:  # raised from p.sample, where the webui shows it to the user
            error = describe(exc)
            log.error("InstantID: %s", error)
        wrap_sample(p, prepared, error)


# -- settings, routes, XYZ -----------------------------------------------------------------------

def on_ui_settings():
    section = ("instantid", "InstantID")
    shared.opts.add_option("instantid_face_device", shared.OptionInfo(
        "CPU", "Face analysis device", gr.Radio, {"choices": ["CPU", "CUDA"]}, section=section)
        .info("CUDA needs onnxruntime-gpu matching your CUDA; the console says which device really ran"))
    shared.opts.add_option("instantid_keep_models", shared.OptionInfo(
        True, "Keep InstantID models in memory between generations", section=section))
    shared.opts.add_option("instantid_extra_path", shared.OptionInfo(
        "", "Extra folder to search for InstantID / IP-Adapter files", section=section))
    shared.opts.add_option("instantid_units", shared.OptionInfo(
        3, "Number of units in the panel", gr.Slider, {"minimum": 1, "maximum": 8, "step": 1}, section=section)
        .needs_reload_ui())


def on_app_started(demo, app):
    api.register(app, locations, face_device, CACHE, convert_output_dir)


def on_before_ui():
    xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return
    labels = {"weight": "Adapter weight", "identitynet_strength": "IdentityNet strength",
              "start": "Adapter start", "end": "Adapter end"}
    for field, attr in XYZ_FIELDS.items():
        xyz.axis_options.append(xyz.AxisOption(f"[InstantID] {labels[field]}", float, xyz.apply_field(attr)))


script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_before_ui(on_before_ui)
