"""webui modules/ui_common.py: ``create_refresh_button`` (a tool button that refreshes choices)."""
from modules.ui_components import ToolButton

refresh_symbol = "\U0001f504"


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    components = refresh_component if isinstance(refresh_component, list) else [refresh_component]

    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        for comp in components:
            for k, v in args.items():
                setattr(comp, k, v)
        import gradio as gr
        return [gr.update(**args) for _ in components]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id)
    button.click(fn=refresh, inputs=[], outputs=components)
    return button
