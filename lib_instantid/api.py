"""HTTP routes (FastAPI), registered on the webui's app by the glue.

- ``GET  /instantid/v1/models``: adapters and IdentityNets found, with what each was detected as;
  the face-analysis status; the named fields ``alwayson_scripts`` accepts.
- ``POST /instantid/v1/detect`` ``{"image": b64, "face": "largest"|int, "width": int, "height": int}``:
  every face (left to right) with bbox, kps, score and embedding (a JSON float list), the index of
  the chosen one, and its keypoint map as a base64 PNG at width x height (default: the photo's size).
- ``POST /instantid/v1/convert`` ``{"input": path, "output": file name, "template": name|path,
  "format": "bin"|"safetensors", "force": bool}``: convert a training checkpoint into the official
  layout (written into the IP-Adapter folder, only if it validates); returns the report as JSON.
- ``POST /instantid/v1/unload``: free every cached model.
Bad input gives HTTP 422 with ``{"detail": "<a sentence naming the field>"}``. JSON only; no pickle.
"""

from __future__ import annotations

import base64
import io
from typing import Callable

import numpy as np

from .errors import FaceAnalysisError, InputError, InstantIDError
from .face_analysis import check_antelopev2
from .model_cache import CACHE, ModelCache
from .params import Field, convert, decode_image, describe_fields
from .pipeline import Locations, kps_map, list_models, preview


def png_base64(image: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def models_info(locations: Locations, cache: ModelCache = CACHE) -> dict:
    found = list_models(locations, cache)
    out = {kind: [{"name": e.name, "path": e.path, "role": e.detected.role, "variant": e.detected.variant,
                   "base": e.detected.base, "tokens": e.detected.tokens, "input": e.detected.needs}
                  for e in entries] for kind, entries in found.items()}
    status = {"ok": False, "root": locations.insightface_roots[0], "message": ""}
    for root in locations.insightface_roots:
        try:
            check_antelopev2(root)
            status.update(ok=True, root=root, message="antelopev2 found")
            break
        except FaceAnalysisError as exc:
            status["message"] = status["message"] or str(exc)
    out["face_analysis"] = status
    out["folders"] = {"adapters": locations.adapter_dirs, "identitynets": locations.controlnet_dirs,
                      "insightface": locations.insightface_roots}
    out["fields"] = describe_fields()
    out["loaded"] = cache.loaded()
    return out


def detect_info(payload: dict, locations: Locations, face_device: str, cache: ModelCache = CACHE) -> dict:
    if not isinstance(payload, dict):
        raise InputError("The request body must be a JSON object with at least the field 'image'.")
    unknown = sorted(set(payload) - {"image", "face", "width", "height"})
    if unknown:
        raise InputError(f"Unknown field '{unknown[0]}'; known fields: image, face, width, height.")
    mode = convert(Field("face", "face", "largest", ""), payload.get("face", "largest"), "")
    size = {}
    for name in ("width", "height"):
        value = payload.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 8192:
                raise InputError(f"Field '{name}' must be an integer number of pixels between 8 and 8192.")
            size[name] = value
    image = decode_image(payload.get("image"), "image")
    if image is None:
        raise InputError("Field 'image' is required: a base64-encoded PNG or JPEG photo.")
    faces, chosen = preview(image, locations, face_device, mode, cache)
    faces = sorted(faces, key=lambda f: float(f.bbox[0]))
    result = {"faces": [{"bbox": [float(v) for v in f.bbox], "kps": [[float(x), float(y)] for x, y in f.kps],
                         "score": float(f.det_score), "embedding": [float(v) for v in f.embedding]}
                        for f in faces],
              "selected": None, "kps_map": None}
    if chosen is not None:
        result["selected"] = next(i for i, f in enumerate(faces) if np.array_equal(f.bbox, chosen.bbox))
        result["kps_map"] = png_base64(kps_map(image, chosen, size.get("width"), size.get("height")))
    return result


def convert_request(payload: dict, output_dir: str):
    """Run the converter for a request (the route and the UI section); returns its ``Report``.

    The output is a file name, written into ``output_dir`` (the IP-Adapter folder) only.
    """
    import os
    from .convert import convert
    if not isinstance(payload, dict):
        raise InputError("The request body must be a JSON object with the fields 'input' and 'output'.")
    unknown = sorted(set(payload) - {"input", "output", "template", "format", "force"})
    if unknown:
        raise InputError(f"Unknown field '{unknown[0]}'; known fields: input, output, template, format, force.")
    source = payload.get("input")
    if not isinstance(source, str) or not source.strip():
        raise InputError("Field 'input' is required: the path of the training checkpoint (file or folder).")
    name = payload.get("output")
    if name is not None and (not isinstance(name, str) or os.path.basename(name) != name or not name.strip()):
        raise InputError("Field 'output' must be a file name (no folder): the file is written into "
                         f"{output_dir}.")
    for field_name in ("template", "format"):
        if payload.get(field_name) is not None and not isinstance(payload[field_name], str):
            raise InputError(f"Field '{field_name}' must be a string.")
    force = payload.get("force", False)
    if not isinstance(force, bool):
        raise InputError("Field 'force' must be true or false.")
    output = os.path.join(output_dir, name) if name else None
    if output:
        os.makedirs(output_dir, exist_ok=True)
    return convert(source.strip(), output, payload.get("template") or None, payload.get("format") or None, force)


def register(app, locations: Callable[[], Locations], face_device: Callable[[], str],
             cache: ModelCache = CACHE, output_dir: Callable[[], str] = lambda: "ipadapter") -> None:
    from fastapi import Body, HTTPException

    def guarded(fn):
        try:
            return fn()
        except InstantIDError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    @app.get("/instantid/v1/models")
    def get_models():
        return guarded(lambda: models_info(locations(), cache))

    @app.post("/instantid/v1/detect")
    def post_detect(payload: dict = Body(...)):
        return guarded(lambda: detect_info(payload, locations(), face_device(), cache))

    @app.post("/instantid/v1/convert")
    def post_convert(payload: dict = Body(...)):
        return guarded(lambda: convert_request(payload, output_dir()).to_dict())

    @app.post("/instantid/v1/unload")
    def post_unload():
        cache.clear()
        return {"loaded": cache.loaded()}
