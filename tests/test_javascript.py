"""javascript/instantid.js: valid JavaScript, and every tooltip targets an element the panel has."""

import os
import re
import shutil
import subprocess

import pytest

JS = os.path.join(os.path.dirname(__file__), "..", "javascript", "instantid.js")
gr = pytest.importorskip("gradio")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_parses():
    subprocess.run(["node", "--check", JS], check=True)


def test_every_tooltip_has_its_element(webui, script_module):
    from modules import scripts
    script = script_module.InstantIDScript()
    with gr.Blocks() as demo:
        scripts.ScriptRunner([script]).setup_ui(is_img2img=False)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    with open(JS, encoding="utf-8") as f:
        keys = re.findall(r'^\s+"(\w+)": "', f.read(), re.M)
    assert len(keys) >= 10
    missing = [k for k in keys if f"script_txt2img_instantid_{k}" not in ids]
    assert not missing, missing
