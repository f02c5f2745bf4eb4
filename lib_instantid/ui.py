"""The panel's units in plain gradio 3.41 components (the webui glue wraps them in its accordion).

``unit_ui`` builds one unit's tab and returns its components keyed by the request field names
(``params.UI_ORDER``), so that the positional values the UI sends are exactly the named fields of
the API, in the same order.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import gradio as gr

from .params import CHOICES, FIELDS_BY_NAME, UI_ORDER


def _slider(name: str, label: str, lo: float, hi: float, eid: Callable[[str], str], step: float = 0.05):
    field = FIELDS_BY_NAME[name]
    return gr.Slider(lo, hi, field.default, step=step, label=label, elem_id=eid(name))


def _choice(name: str, label: str, eid, shown=None):
    field = FIELDS_BY_NAME[name]
    choices = [c if c else "auto" for c in (shown or CHOICES[name])]
    return gr.Dropdown(choices, value=field.default or "auto", label=label, elem_id=eid(name))


def unit_ui(index: int, adapters: Sequence[str], identitynets: Sequence[str], encoders: Sequence[str],
            eid: Callable[[str], str]) -> Dict[str, gr.components.Component]:
    """One unit; ``eid(name)`` gives element ids (the unit index is folded in by the caller)."""
    c: Dict[str, gr.components.Component] = {}
    c["enabled"] = gr.Checkbox(index == 0, label="Use this unit", elem_id=eid("unit_enabled"))
    with gr.Row():
        c["image"] = gr.Image(label="Reference photo", type="numpy", elem_id=eid("image"))
        c["preview"] = gr.Image(label="Detected face and keypoints", interactive=False, elem_id=eid("preview"))
    c["images"] = gr.File(label="More reference photos (optional)", file_count="multiple", file_types=["image"],
                          elem_id=eid("images"))
    with gr.Row():
        c["adapter"] = gr.Dropdown(list(adapters), value=adapters[0] if adapters else None,
                                   label="Model (InstantID, IP-Adapter or FaceID file)", elem_id=eid("adapter"))
        c["refresh"] = gr.Button("\U0001f504", elem_id=eid("refresh"), scale=0, min_width=40)
        c["detect"] = gr.Button("Detect face", elem_id=eid("detect"), scale=0)
    c["info"] = gr.Markdown("", elem_id=eid("info"))
    with gr.Row():
        c["weight"] = _slider("weight", "Weight", -1.0, 3.0, eid)
        c["start"] = _slider("start", "Start", 0.0, 1.0, eid, 0.01)
        c["end"] = _slider("end", "End", 0.0, 1.0, eid, 0.01)
        c["weight_type"] = _choice("weight_type", "Weight type", eid)
    with gr.Accordion("InstantID: IdentityNet and pose", open=True):
        with gr.Row():
            c["identitynet"] = gr.Dropdown(list(identitynets), value=identitynets[0] if identitynets else None,
                                           label="IdentityNet (ControlNet)", elem_id=eid("identitynet"))
            c["pose_image"] = gr.Image(label="Pose photo (optional)", type="numpy", elem_id=eid("pose"))
        with gr.Row():
            c["identitynet_strength"] = _slider("identitynet_strength", "IdentityNet strength", 0.0, 2.0, eid)
            c["identitynet_start"] = _slider("identitynet_start", "IdentityNet start", 0.0, 1.0, eid, 0.01)
            c["identitynet_end"] = _slider("identitynet_end", "IdentityNet end", 0.0, 1.0, eid, 0.01)
            c["hires_identitynet"] = gr.Checkbox(True, label="IdentityNet in hires pass",
                                                 elem_id=eid("hires_identitynet"))
    with gr.Accordion("More options", open=False):
        with gr.Row():
            c["face"] = gr.Dropdown(["largest"] + [str(i) for i in range(10)], value="largest",
                                    label="Face (largest, or index from the left)", elem_id=eid("face"))
            c["combine"] = _choice("combine", "Several photos", eid)
            c["hires_adapter"] = gr.Checkbox(True, label="Use in hires pass", elem_id=eid("hires_adapter"))
        with gr.Row():
            c["encoder"] = gr.Dropdown(["auto"] + list(encoders), value="auto", label="Image encoder",
                                       elem_id=eid("encoder"))
            c["variant"] = _choice("variant", "Variant (override)", eid)
            c["composition_weight"] = _slider("composition_weight", "Composition weight", -1.0, 3.0, eid)
        with gr.Row():
            c["lora_strength"] = _slider("lora_strength", "FaceID LoRA strength", 0.0, 2.0, eid)
            c["s_scale"] = _slider("s_scale", "FaceID-Plus v2 structure (s_scale)", 0.0, 3.0, eid)
        with gr.Row():
            c["negative_image"] = gr.Image(label="Negative image (optional)", type="numpy", elem_id=eid("negative"))
            c["mask"] = gr.Image(label="Attention mask (optional; white = here)", type="numpy", elem_id=eid("mask"))
    return c


def positional(components: Dict[str, gr.components.Component]) -> List[gr.components.Component]:
    """A unit's components in the order of the request's fields."""
    return [components[name] for name in UI_ORDER]


def converter_ui(templates: Sequence[str], eid: Callable[[str], str]) -> Dict[str, gr.components.Component]:
    """The converter's section: a training checkpoint in, an official adapter file out, a report."""
    c: Dict[str, gr.components.Component] = {}
    with gr.Accordion("Convert a training checkpoint into an adapter file", open=False):
        with gr.Row():
            c["input"] = gr.Textbox(label="Checkpoint (checkpoint-N folder or .bin / .safetensors file)",
                                    elem_id=eid("convert_input"))
            c["output"] = gr.Textbox(label="Output file name (written into models/ipadapter)",
                                     placeholder="my-ip-adapter.safetensors", elem_id=eid("convert_output"))
        with gr.Row():
            c["template"] = gr.Dropdown(["auto"] + list(templates), value="auto", label="Template",
                                        elem_id=eid("convert_template"))
            c["force"] = gr.Checkbox(False, label="Write even if it does not validate", elem_id=eid("convert_force"))
            c["run"] = gr.Button("Convert", elem_id=eid("convert_run"))
        c["report"] = gr.Textbox(label="Report", lines=12, interactive=False, elem_id=eid("convert_report"))
    return c
