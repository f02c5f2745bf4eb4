"""Face analysis with insightface (detection + ArcFace embedding).

Two model packs: antelopev2 (InstantID, as the official pipeline) and buffalo_l (IP-Adapter FaceID,
whose embeddings were trained on it). Layout on disk: ``<insightface_root>/models/<pack>/*.onnx``;
in the webui the root is ``<webui>/models/insightface``. ``check_pack`` validates that folder before
insightface is touched, so insightface never tries to download anything. ``FaceAnalyzer`` loads the
models on first use, runs them (CPU by default) and caches results per image content.

insightface and onnxruntime are imported lazily: this module imports without them.
"""

import hashlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np

from .errors import FaceAnalysisError

logger = logging.getLogger("instantid")

PACK_NAME = "antelopev2"
# pack -> (detector, recognizer), optional files
PACKS = {
    "antelopev2": (("scrfd_10g_bnkps.onnx", "glintr100.onnx"), ("2d106det.onnx", "1k3d68.onnx", "genderage.onnx")),
    "buffalo_l": (("det_10g.onnx", "w600k_r50.onnx"), ("2d106det.onnx", "1k3d68.onnx", "genderage.onnx")),
}
REQUIRED_FILES, OPTIONAL_FILES = PACKS[PACK_NAME]
DET_SIZES = (640, 576, 512, 448, 384, 320, 256)
CACHE_SIZE = 16
NO_FACE_MESSAGE = (
    "No face was detected in the reference image; use a photo where the face is clearly visible, "
    "frontal and not too small."
)


def check_antelopev2(insightface_root: str) -> str:
    """Return ``<root>/models/antelopev2`` or raise FaceAnalysisError saying how to fix the folder."""
    return check_pack(insightface_root, "antelopev2")


def check_pack(insightface_root: str, pack: str = PACK_NAME) -> str:
    """Return ``<root>/models/<pack>`` or raise FaceAnalysisError saying how to fix the folder."""
    required, optional = PACKS[pack]
    root = os.path.abspath(os.path.expanduser(str(insightface_root)))
    model_dir = os.path.join(root, "models", pack)
    where = "Download the %s face models and put the .onnx files (%s) directly in %s" % (
        pack, ", ".join(required + optional), model_dir)
    if not os.path.isdir(model_dir):
        hint = ""
        if os.path.isfile(model_dir + ".zip"):
            hint = " There is a %s.zip next to it: unzip it there." % pack
        elif os.path.isdir(os.path.join(root, pack)):
            hint = " A folder %s exists: move it into %s." % (os.path.join(root, pack), os.path.join(root, "models"))
        raise FaceAnalysisError("The %s face model folder %s does not exist.%s %s." % (pack, model_dir, hint, where))
    present = set(name for name in os.listdir(model_dir) if name.lower().endswith(".onnx"))
    nested = os.path.join(model_dir, pack)
    if os.path.isdir(nested) and any(n.lower().endswith(".onnx") for n in os.listdir(nested)):
        if not all(name in present for name in required):
            raise FaceAnalysisError(
                "The %s models were unpacked one folder too deep (%s): move the .onnx files up "
                "one level into %s and delete the empty inner %s folder." % (pack, nested, model_dir + os.sep, pack))
    missing = [name for name in required if name not in present]
    if missing:
        state = "is empty" if not present else "is incomplete (missing %s)" % ", ".join(missing)
        raise FaceAnalysisError("The %s face model folder %s %s. %s." % (pack, model_dir, state, where))
    for name in required:
        if os.path.getsize(os.path.join(model_dir, name)) == 0:
            raise FaceAnalysisError(
                "The face model %s is an empty file (an interrupted download?). %s." % (os.path.join(model_dir, name), where))
    absent = [name for name in optional if name not in present]
    if absent:
        logger.debug("%s: optional files not present (not needed): %s", pack, ", ".join(absent))
    return model_dir


@dataclass(frozen=True)
class Face:
    """One detected face; coordinates are pixels of the analysed image."""

    bbox: np.ndarray  # (4,) float32 x0, y0, x1, y1
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left and right mouth corner (image left)
    det_score: float
    embedding: np.ndarray  # (512,) float32, raw ArcFace output (what InstantID feeds its resampler)

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / max(float(np.linalg.norm(self.embedding)), 1e-12)

    @property
    def area(self) -> float:
        return float(max(self.bbox[2] - self.bbox[0], 0.0) * max(self.bbox[3] - self.bbox[1], 0.0))


def _frozen(array, shape) -> np.ndarray:
    out = np.array(array, dtype=np.float32).reshape(shape)
    out.flags.writeable = False
    return out


def _as_rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise FaceAnalysisError("The reference image must be an 8-bit picture (got pixel type %s)." % image.dtype)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 8:
        raise FaceAnalysisError("The reference image must be an RGB picture (got an array of shape %s)." % (image.shape,))
    return np.ascontiguousarray(image[:, :, :3])


def _providers_for(device: str):
    device = str(device).lower()
    if device == "cpu":
        return ["CPUExecutionProvider"], -1
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], 0
    if device.startswith("cuda:") and device[5:].isdigit():
        index = int(device[5:])
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
    raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N', not %r" % device)


class FaceAnalyzer:
    """insightface detection + recognition of one pack, loaded on first use, cached by image content."""

    def __init__(self, insightface_root: str, device: str = "cpu", cache_size: int = CACHE_SIZE,
                 pack: str = PACK_NAME):
        if pack not in PACKS:
            raise ValueError("pack must be one of %s, not %r" % (", ".join(PACKS), pack))
        self.pack = pack
        self.insightface_root = str(insightface_root)
        self.device = device
        self._providers, self._ctx_id = _providers_for(device)
        self._app = None
        self._lock = threading.RLock()
        self._cache = OrderedDict()
        self._cache_size = int(cache_size)
        self.providers_used = ()  # provider names the ORT sessions actually use, known after loading
        self.runs = 0  # how many times face analysis actually ran (cache misses)
        self.det_sizes_tried = []  # detector sizes tried by the last analysis run, in order
        self.last_det_size = None  # size that found faces in the last run (None: no face)

    # -- loading ---------------------------------------------------------------------------------
    def _load(self):
        if self._app is not None:
            return self._app
        model_dir = check_pack(self.insightface_root, self.pack)  # before insightface: it would download
        detector_file, recognizer_file = PACKS[self.pack][0]
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise FaceAnalysisError(
                "insightface (or onnxruntime) is not installed or cannot be imported (%s). Restart the webui "
                "so the extension's install.py can install it, or run: pip install --no-deps insightface==2.1 "
                "onnx==1.17.0 onnxruntime." % exc) from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # ORT warns when CUDA is requested but absent
                app = FaceAnalysis(name=model_dir, root=self.insightface_root, providers=self._providers,
                                   allowed_modules=["detection", "recognition"])
                app.prepare(ctx_id=self._ctx_id, det_size=(640, 640))
        except AssertionError as exc:
            raise FaceAnalysisError(
                "insightface found no usable face detector in %s. Replace %s with a fresh copy of the %s "
                "pack." % (model_dir, detector_file, self.pack)) from exc
        except Exception as exc:  # a corrupt or foreign .onnx file: say which folder to fix
            raise FaceAnalysisError(
                "The %s face models in %s could not be loaded (%s: %s). Download the %s pack again and "
                "replace the .onnx files." % (self.pack, model_dir, type(exc).__name__, exc, self.pack)) from exc
        if "recognition" not in app.models:
            raise FaceAnalysisError(
                "insightface found no usable face recognition model in %s. Replace %s with a fresh copy of "
                "the %s pack." % (model_dir, recognizer_file, self.pack))
        self._record_providers(app)
        self._app = app
        return app

    def _record_providers(self, app):
        used = []
        for task, model in app.models.items():
            names = list(model.session.get_providers())
            logger.info("face analysis: %s runs on %s", task, ", ".join(names))
            used += [name for name in names if name not in used]
        self.providers_used = tuple(used)
        if self._ctx_id >= 0 and "CUDAExecutionProvider" not in used:
            logger.warning(
                "Face analysis was asked to use CUDA but onnxruntime runs it on %s. Install the onnxruntime-gpu "
                "build that matches your CUDA version (and not the CPU onnxruntime next to it) to use the GPU.",
                ", ".join(used) or "no provider")

    # -- analysis --------------------------------------------------------------------------------
    def detect(self, image_rgb) -> List[Face]:
        """All faces in an RGB uint8 image, in detector order; [] if none. Cached by pixel content."""
        image = _as_rgb_uint8(image_rgb)
        key = (hashlib.blake2b(image.tobytes(), digest_size=20).hexdigest(), image.shape)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return list(self._cache[key])
            faces = self._analyse(image)
            self._cache[key] = tuple(faces)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return list(faces)

    def _analyse(self, image_rgb):
        app = self._load()  # raises FaceAnalysisError first when insightface is missing
        from insightface.app.common import Face as InsightFace

        self.runs += 1
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        detector, recognizer = app.models["detection"], app.models["recognition"]
        shape = detector.session.get_inputs()[0].shape
        static = all(isinstance(v, int) and v > 0 for v in shape[2:4])
        sizes = [None] if static else [(s, s) for s in DET_SIZES]  # a static detector has one size only
        self.det_sizes_tried, self.last_det_size = [], None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image/numpy deprecations in insightface
            for size in sizes:
                self.det_sizes_tried.append(size or tuple(shape[2:4][::-1]))
                boxes, kpss = detector.detect(bgr, input_size=size, max_num=0)
                if len(boxes):
                    self.last_det_size = self.det_sizes_tried[-1]
                    break
            else:
                logger.info("face analysis: no face found at sizes %s", self.det_sizes_tried)
                return []
            if kpss is None:
                raise FaceAnalysisError(
                    "The face detector in %s gives no facial keypoints; use %s from the %s pack."
                    % (os.path.dirname(detector.model_file), PACKS[self.pack][0][0], self.pack))
            faces = []
            for box, kps in zip(boxes, kpss):
                found = InsightFace(bbox=box[:4], kps=kps, det_score=box[4])
                recognizer.get(bgr, found)
                faces.append(Face(bbox=_frozen(box[:4], (4,)), kps=_frozen(kps, (5, 2)),
                                  det_score=float(box[4]), embedding=_frozen(found.embedding, (-1,))))
        logger.debug("face analysis: %d face(s) at det size %s", len(faces), self.last_det_size)
        return faces

    def analyze(self, image_rgb, mode: Union[str, int] = "largest") -> Face:
        """Detect and choose one face (see ``select_face``)."""
        return select_face(self.detect(image_rgb), mode)


def select_face(faces: Sequence[Face], mode: Union[str, int] = "largest") -> Face:
    """``"largest"`` (bbox area; also for None) or an index counted left to right (bbox x0), 0-based."""
    faces = list(faces)
    if not faces:
        raise FaceAnalysisError(NO_FACE_MESSAGE)
    if mode is None or (isinstance(mode, str) and mode.strip().lower() == "largest"):
        return max(faces, key=lambda f: f.area)
    try:
        if isinstance(mode, bool) or isinstance(mode, float):
            raise ValueError
        index = int(mode)
    except (TypeError, ValueError):
        raise FaceAnalysisError(
            "Unknown face choice %r: use 'largest' or a face number counted from the left, starting at 0." % (mode,)
        ) from None
    if not 0 <= index < len(faces):
        raise FaceAnalysisError(
            "Face number %d was requested but the reference image has %d face(s); use a number from 0 to %d "
            "(counted from the left) or 'largest'." % (index, len(faces), len(faces) - 1))
    return sorted(faces, key=lambda f: float(f.bbox[0]))[index]


def align_face_crop(image_rgb, face: Face, size: int = 224) -> np.ndarray:
    """ArcFace-aligned square crop (insightface ``norm_crop``), RGB uint8 ``size`` x ``size``."""
    if size <= 0 or (size % 112 and size % 128):
        raise ValueError("align_face_crop size must be a multiple of 112 or 128, not %r" % size)
    from insightface.utils import face_align

    image = _as_rgb_uint8(image_rgb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(image, landmark=np.asarray(face.kps, np.float32).reshape(5, 2), image_size=size)
