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
from lib_instantid import api, infotext
from lib_instantid import params as P
from lib_instantid.errors import InstantIDError
from lib_instantid.model_cache import CACHE
from lib_instantid.pipeline import default_locations, list_models, prepare, preview, preview_picture

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
    try:
        found = list_models(locations(), CACHE)
    except Exception as exc:  # a listing problem must never break the UI
        log.warning("InstantID: could not list models: %s", exc)
        return [], []
    adapters = [e.name for e in found["adapters"] if e.detected.variant == "instantid"]
    return adapters, [e.name for e in found["identitynets"] if e.detected.base == "sdxl"]


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


def infotext_fields_for(enabled, components):
    def getter(name):
        def get(params):
            units = infotext.units_in(params)
            return units[0].get(name, gr.update()) if units else gr.update()
        return get

    fields = [(enabled, lambda params: bool(infotext.units_in(params)))]
    for name in infotext.SAVED:
        fields.append((components[name], getter(name)))
    return fields


class InstantIDScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return "InstantID"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_common import create_refresh_button
        from modules.ui_components import InputAccordion, ToolButton

        eid = self.elem_id
        adapters, identitynets = model_choices()
        with InputAccordion(False, label="InstantID", elem_id=eid("enabled")) as enabled:
            with gr.Row():
                image = gr.Image(label="Face photo", type="numpy", elem_id=eid("image"))
                pose = gr.Image(label="Pose photo (optional)", type="numpy", elem_id=eid("pose"))
                shown = gr.Image(label="Detected face and keypoints", interactive=False, elem_id=eid("preview"))
            more = gr.File(label="More photos of the same person (optional; embeddings are averaged)",
                           file_count="multiple", file_types=["image"], elem_id=eid("images"))
            with gr.Row():
                adapter = gr.Dropdown(adapters, value=adapters[0] if adapters else None,
                                      label="InstantID adapter", elem_id=eid("adapter"))
                identitynet = gr.Dropdown(identitynets, value=identitynets[0] if identitynets else None,
                                          label="IdentityNet (ControlNet)", elem_id=eid("identitynet"))
                create_refresh_button(adapter, lambda: None, lambda: {"choices": model_choices()[0]},
                                      eid("refresh_adapter"))
                create_refresh_button(identitynet, lambda: None, lambda: {"choices": model_choices()[1]},
                                      eid("refresh_identitynet"))
                free = ToolButton("\U0001f5d1\ufe0f", elem_id=eid("free"))
            with gr.Row():
                weight = gr.Slider(-1.0, 3.0, 0.8, step=0.05, label="Adapter weight", elem_id=eid("weight"))
                start = gr.Slider(0.0, 1.0, 0.0, step=0.01, label="Adapter start", elem_id=eid("start"))
                end = gr.Slider(0.0, 1.0, 1.0, step=0.01, label="Adapter end", elem_id=eid("end"))
            with gr.Row():
                strength = gr.Slider(0.0, 2.0, 0.8, step=0.05, label="IdentityNet strength",
                                     elem_id=eid("identitynet_strength"))
                cn_start = gr.Slider(0.0, 1.0, 0.0, step=0.01, label="IdentityNet start",
                                     elem_id=eid("identitynet_start"))
                cn_end = gr.Slider(0.0, 1.0, 1.0, step=0.01, label="IdentityNet end",
                                   elem_id=eid("identitynet_end"))
            with gr.Row():
                face = gr.Dropdown(["largest"] + [str(i) for i in range(10)], value="largest",
                                   label="Face (largest, or index from the left)", elem_id=eid("face"))
                hires_adapter = gr.Checkbox(True, label="Adapter in hires pass", elem_id=eid("hires_adapter"))
                hires_cn = gr.Checkbox(True, label="IdentityNet in hires pass", elem_id=eid("hires_identitynet"))
                detect = gr.Button("Detect face", elem_id=eid("detect"))
            message = gr.Markdown("", elem_id=eid("message"))
            unit_enabled = gr.Checkbox(True, visible=False, elem_id=eid("unit_enabled"))
        detect.click(preview_image, inputs=[image, pose, face], outputs=[shown, message])
        free.click(free_models, inputs=[], outputs=[message])

        unit = [unit_enabled, image, more, pose, adapter, identitynet, weight, start, end, strength,
                cn_start, cn_end, face, hires_adapter, hires_cn]   # the order of params.UI_ORDER
        self.infotext_fields = infotext_fields_for(enabled, dict(zip(P.UI_ORDER, unit)))
        self.paste_field_names = []
        return [enabled] + unit

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


def on_app_started(demo, app):
    api.register(app, locations, face_device, CACHE)


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
