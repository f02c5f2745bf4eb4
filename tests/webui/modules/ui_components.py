"""webui modules/ui_components.py: the few components extensions use (gradio 3.41)."""
import gradio as gr


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


class ToolButton(FormComponent, gr.Button):
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class FormRow(FormComponent, gr.Row):
    def get_block_name(self):
        return "row"


class FormGroup(FormComponent, gr.Group):
    def get_block_name(self):
        return "group"


class InputAccordion(gr.Checkbox):
    """A hidden checkbox whose value (bool) says whether the accordion is open: its value is the arg."""

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or "input-accordion"
        label = kwargs.get("label", "Accordion")
        args = dict(kwargs, elem_id=f"{self.accordion_id}-checkbox", visible=False)
        super().__init__(value, **args)
        self.accordion = gr.Accordion(label=label, open=value, elem_id=self.accordion_id)

    def extra(self):
        return gr.Column(elem_id=self.accordion_id + "-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
