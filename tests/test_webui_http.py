"""Opt-in: drive a real running webui with this extension installed, over HTTP.

Skipped unless WEBUI_URL is set, e.g.::

    WEBUI_URL=http://127.0.0.1:7860 python -m pytest tests/test_webui_http.py

The webui must run with ``--api``. Tests that need InstantID's model files or an SDXL checkpoint are
skipped (with the reason) when ``GET /instantid/v1/models`` says they are missing.
"""

import base64
import io
import json
import os
import urllib.error
import urllib.request

import pytest

URL = os.environ.get("WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="WEBUI_URL is not set (opt-in suite for a running webui)")
TIMEOUT = float(os.environ.get("WEBUI_TIMEOUT", "900"))


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"detail": text}


def face_b64():
    from PIL import Image
    from skimage import data
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def models():
    status, body = call("GET", "/instantid/v1/models")
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def ready(models):
    if not models["adapters"] or not models["identitynets"]:
        pytest.skip("no InstantID adapter / IdentityNet in the webui's model folders")
    if not models["face_analysis"]["ok"]:
        pytest.skip("antelopev2 is not installed: " + models["face_analysis"]["message"])
    status, options = call("GET", "/sdapi/v1/options")
    return options


def txt2img(args=None, seed=1234):
    payload = {"prompt": "portrait photo of a person", "negative_prompt": "blurry", "steps": 4, "cfg_scale": 5,
               "width": 512, "height": 512, "seed": seed, "sampler_name": "Euler"}
    if args is not None:
        payload["alwayson_scripts"] = {"InstantID": {"args": args}}
    return call("POST", "/sdapi/v1/txt2img", payload)


def test_script_is_listed():
    status, body = call("GET", "/sdapi/v1/scripts")
    assert status == 200
    assert "instantid" in body["txt2img"] and "instantid" in body["img2img"]


def test_models_route_describes_folders_and_fields(models):
    assert {"adapters", "identitynets", "face_analysis", "folders", "fields"} <= set(models)
    assert any(f["name"] == "identitynet_strength" for f in models["fields"])


def test_detect_route_returns_json_faces(ready):
    status, body = call("POST", "/instantid/v1/detect", {"image": face_b64()})
    assert status == 200, body
    assert body["faces"] and len(body["faces"][0]["embedding"]) == 512 and body["kps_map"]


def test_invalid_field_fails_the_request_with_its_name(ready):
    status, body = txt2img([{"enabled": True, "image": face_b64(), "weight": "heavy"}])
    assert status != 200
    assert "Field 'weight' must be a number" in json.dumps(body)


def test_generation_with_instantid_and_exact_restore(ready):
    status, before = txt2img()
    assert status == 200
    status, body = txt2img([{"enabled": True, "image": face_b64()}])
    if status != 200 and "only with SDXL" in json.dumps(body):
        pytest.skip("the loaded checkpoint is not SDXL")
    assert status == 200, body
    assert "InstantID:" in json.loads(body["info"])["infotexts"][0]
    assert body["images"][0] != before["images"][0]
    status, after = txt2img()
    assert after["images"][0] == before["images"][0]     # no patch left behind
