"""webui modules/scripts.py: ``Script``, ``AlwaysVisible`` and the runner's hook calls.

Runner hooks call ``script.<hook>(p, *p.script_args[args_from:args_to], **kwargs)`` for every
always-on script, each inside ``try/except Exception`` that reports and goes on (v1.10.1
``ScriptRunner.process`` ... ``postprocess``): an exception in a hook never stops a generation.
"""
import re
from collections import namedtuple

from modules import errors

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass


class ScriptRunner:
    def __init__(self, scripts):
        self.alwayson_scripts = list(scripts)
        self.inputs = [None]
        for script in self.alwayson_scripts:
            script.alwayson = True

    def setup_ui(self, is_img2img):
        """ui() for every script; its components' values become the default args (as the API does)."""
        for script in self.alwayson_scripts:
            script.is_img2img = is_img2img
            script.is_txt2img = not is_img2img
            controls = script.ui(is_img2img) or []
            script.args_from = len(self.inputs)
            self.inputs += controls
            script.args_to = len(self.inputs)

    def default_args(self):
        return [getattr(c, "value", None) for c in self.inputs]

    def _each(self, hook, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *args, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            try:
                script.postprocess(p, processed, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running postprocess: {script.filename}", exc_info=True)

    def before_hr(self, p):
        self._each("before_hr", p)
