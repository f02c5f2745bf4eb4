"""The HTTP routes on a FastAPI app, as the webui's app gets them (JSON only, errors name the field)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from lib_instantid import api
from lib_instantid.model_cache import ModelCache
from lib_instantid.pipeline import default_locations

pytest.importorskip("insightface")
fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from face_pack import ASTRONAUT_BOX, ASTRONAUT_KPS  # noqa: E402


def b64(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(models_path):
    app = fastapi.FastAPI()
    cache = ModelCache()
    api.register(app, lambda: default_locations(str(models_path)), lambda: "cpu", cache)
    return TestClient(app)


def test_models_lists_files_with_their_detected_kind(client):
    r = client.get("/instantid/v1/models")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert sorted((a["name"], a["variant"], a["base"]) for a in body["adapters"]) == [
        ("ip-adapter-faceid_sd15.bin", "faceid", "sd15"), ("ip-adapter-plus_sd15.safetensors", "plus", "sd15"),
        ("ip-adapter.bin", "instantid", "sdxl"), ("ip-adapter_sdxl_vit-h.safetensors", "base", "sdxl")]
    assert [c["name"] for c in body["identitynets"]] == ["ControlNetModel"]
    assert [(e["name"], e["variant"]) for e in body["encoders"]] == [
        ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "ViT (1280 wide, 2 layers)")]
    assert body["face_analysis"]["ok"] is True
    assert {f["name"] for f in body["fields"]} >= {"image", "weight", "identitynet_strength", "face"}


def test_detect_returns_faces_embedding_and_kps_map(client, astronaut):
    r = client.post("/instantid/v1/detect", json={"image": "data:image/png;base64," + b64(astronaut)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["faces"]) == 1 and body["selected"] == 0
    face = body["faces"][0]
    np.testing.assert_allclose(face["bbox"], ASTRONAUT_BOX, atol=1e-3)
    np.testing.assert_allclose(face["kps"], ASTRONAUT_KPS, atol=1e-3)
    assert len(face["embedding"]) == 512 and all(isinstance(v, float) for v in face["embedding"])
    kps_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["kps_map"]))))
    assert kps_map.shape == (512, 512, 3)
    x, y = ASTRONAUT_KPS[2].astype(int)
    assert tuple(kps_map[y, x]) == (0, 0, 255)            # the nose point, blue
    r = client.post("/instantid/v1/detect", json={"image": b64(astronaut), "width": 768, "height": 512})
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["kps_map"])))).shape == (512, 768, 3)


@pytest.mark.parametrize("payload,field", [
    ({}, "image"),
    ({"image": "not base64 at all!"}, "image"),
    ({"image": "aGVsbG8="}, "image"),
    ({"image": "aGVsbG8=", "colour": 1}, "colour"),
    ({"image": "aGVsbG8=", "width": "wide"}, "width"),
    ({"image": "aGVsbG8=", "face": "biggest"}, "face"),
])
def test_bad_input_is_a_422_that_names_the_field(client, payload, field):
    r = client.post("/instantid/v1/detect", json=payload)
    assert r.status_code == 422
    assert f"'{field}'" in r.json()["detail"]


def test_missing_face_models_say_where_to_put_them(tmp_path, astronaut):
    app = fastapi.FastAPI()
    api.register(app, lambda: default_locations(str(tmp_path / "models")), lambda: "cpu", ModelCache())
    c = TestClient(app)
    r = c.post("/instantid/v1/detect", json={"image": b64(astronaut)})
    assert r.status_code == 422
    assert "models/insightface/models/antelopev2" in r.json()["detail"].replace("\\", "/")
    assert c.get("/instantid/v1/models").json()["face_analysis"]["ok"] is False


def test_unload_frees_the_cache(client, astronaut):
    client.post("/instantid/v1/detect", json={"image": b64(astronaut)})
    assert client.get("/instantid/v1/models").json()["loaded"]
    assert client.post("/instantid/v1/unload").json() == {"loaded": []}


def test_convert_route_reports_and_writes_into_the_adapter_folder(tmp_path, models_path):
    import torch
    from model_factory import load_manifest, state_dict_from_manifest
    sd = state_dict_from_manifest(load_manifest("ip-adapter_sd15.bin"))
    training = {f"image_proj_model.{k}": v for k, v in sd["image_proj"].items()}
    training.update({f"adapter_modules.{k}": v for k, v in sd["ip_adapter"].items()})
    training["unet.conv_in.weight"] = torch.zeros(320, 4, 3, 3)
    ckpt = tmp_path / "checkpoint-100"
    ckpt.mkdir()
    torch.save(training, str(ckpt / "pytorch_model.bin"))
    out_dir = tmp_path / "ipadapter"
    app = fastapi.FastAPI()
    api.register(app, lambda: default_locations(str(models_path)), lambda: "cpu", ModelCache(), lambda: str(out_dir))
    c = TestClient(app)
    r = c.post("/instantid/v1/convert", json={"input": str(ckpt), "output": "mine.safetensors"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] is True and report["variant"] == "base" and report["written"].endswith("mine.safetensors")
    assert (out_dir / "mine.safetensors").is_file()
    r = c.post("/instantid/v1/convert", json={"input": str(ckpt), "output": "../escape.bin"})
    assert r.status_code == 422 and "'output' must be a file name" in r.json()["detail"]
    r = c.post("/instantid/v1/convert", json={"input": str(tmp_path / "nothing")})
    assert r.status_code == 422
