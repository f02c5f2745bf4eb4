"""Tiny synthetic antelopev2 packs that drive the real insightface code offline.

``build_pack(root, ...)`` writes ``<root>/models/antelopev2/`` with the five antelopev2 file
names. The graphs are only big enough to be routed by insightface's model router to the same
classes as the real files (detector, ArcFace recogniser, two landmark models, gender/age):

* ``det="marker"``: a dynamic-size SCRFD look-alike. A stride-32 cell of the detector input that
  is (almost) pure red is "face"; only the top-left cell of a red block fires, so one red square
  gives one face. The face box spans 2x2 cells from that cell and the 5 keypoints sit where the
  ArcFace template puts them in that box. With ``max_cells=k`` a red block that is ``k`` or more
  cells wide (or tall) is ignored, like a real detector missing a face too large for it, which
  makes the smaller retry sizes observable.
* ``det="constant"``: a static 640x640 detector whose outputs are constants, placing each face
  of ``faces`` exactly. ``faces`` is a list of ``(box, kps, score)`` in *image* pixels of an image
  of ``image_size`` (width, height); the builder converts them to detector pixels the way
  insightface letterboxes.

Everything here is our own code; no real model weights are involved.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx")
PACK_FILES = {"antelopev2": FILES,
              "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx")}
STRIDES = (8, 16, 32)
# ArcFace 112x112 alignment template (public constants used by every ArcFace implementation).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# astronaut (skimage.data.astronaut, public domain): consensus of three real landmarkers
ASTRONAUT_KPS = np.array([[204.0, 101.4], [246.6, 103.8], [224.4, 128.7], [201.5, 139.1], [245.4, 141.3]], np.float32)
ASTRONAUT_BOX = np.array([180.0, 70.0, 268.0, 172.0], np.float32)
MARKER_BOX_CELLS = 2  # marker face box: 2x2 stride-32 cells from the firing cell


class _Graph:
    """Collects nodes and initializers with readable auto-generated names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, value, dtype=np.float32):
        self._n += 1
        name = "c%d" % self._n
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, *inputs, **attrs):
        self._n += 1
        out = "t%d" % self._n
        # node names must not start with Sub/Mul: insightface would pick mxnet mean/std
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name="n%d_%s" % (self._n, op_type.lower()), **attrs))
        return out

    def save(self, path, inp, outputs):
        """``outputs``: list of (tensor name, shape) -> graph outputs named out0, out1, ..."""
        outs = []
        for i, (name, shape) in enumerate(outputs):
            self.nodes.append(helper.make_node("Identity", [name], ["out%d" % i], name="n_out%d" % i))
            outs.append(helper.make_tensor_value_info("out%d" % i, TensorProto.FLOAT, shape))
        graph = helper.make_graph(self.nodes, "fake", [inp], outs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        onnx.checker.check_model(model)
        onnx.save(model, path)


def _head(g, per_cell_map, width):
    """[1, 2*width, gh, gw] (anchor-major) -> [N, width], rows in insightface's anchor order."""
    t = g.op("Transpose", per_cell_map, perm=[0, 2, 3, 1])
    return g.op("Reshape", t, g.const([-1, width], np.int64))


def _shift(g, x, axis, by):
    """y[..., i, ...] = x[..., i - by, ...] along a spatial axis (2 or 3), zero filled; by may be < 0."""
    pads = [0] * 8
    if by > 0:
        pads[axis] = by
        start, end = 0, -by
    else:
        pads[axis + 4] = -by
        start, end = -by, np.iinfo(np.int64).max
    padded = g.op("Pad", x, g.const(pads, np.int64))
    return g.op("Slice", padded, g.const([start], np.int64), g.const([end], np.int64), g.const([axis], np.int64))


def _marker_detector(path, max_cells):
    g = _Graph()
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])
    redness = g.op("Conv", "input.1", g.const(np.array([1.0, -0.5, -0.5]).reshape(1, 3, 1, 1)))
    cells = {s: g.op("AveragePool", redness, kernel_shape=[s, s], strides=[s, s]) for s in STRIDES}
    # a pure red cell averages 1.99 in the normalised blob, a blank one 0
    red = g.op("Sigmoid", g.op("Mul", g.op("Add", cells[32], g.const(-1.2)), g.const(12.0)))
    score = red
    blockers = [_shift(g, red, 3, 1), _shift(g, red, 2, 1)]  # red cell on the left / above
    if max_cells:
        blockers += [_shift(g, red, 3, 1 - max_cells), _shift(g, red, 2, 1 - max_cells)]
    for b in blockers:
        score = g.op("Mul", score, g.op("Add", g.op("Neg", b), g.const(1.0)))

    kps = (ARCFACE_TEMPLATE * (MARKER_BOX_CELLS / 112.0)).reshape(-1)  # stride units from the anchor
    box = np.array([0, 0, MARKER_BOX_CELLS, MARKER_BOX_CELLS], np.float32)
    outs = {}
    for s in STRIDES:
        zeros = g.op("Mul", cells[s], g.const(0.0))  # [1,1,gh,gw]
        ones = g.op("Add", zeros, g.const(1.0))
        sc = score if s == 32 else zeros
        outs[("score", s)] = _head(g, g.op("Concat", sc, zeros, axis=1), 1)
        per_box = np.concatenate([box, box]) if s == 32 else np.zeros(8)
        per_kps = np.concatenate([kps, kps]) if s == 32 else np.zeros(20)
        outs[("bbox", s)] = _head(g, g.op("Mul", ones, g.const(per_box.reshape(1, 8, 1, 1))), 4)
        outs[("kps", s)] = _head(g, g.op("Mul", ones, g.const(per_kps.reshape(1, 20, 1, 1))), 10)
    order = [(kind, s) for kind in ("score", "bbox", "kps") for s in STRIDES]
    widths = {"score": 1, "bbox": 4, "kps": 10}
    g.save(path, inp, [(outs[k], ["n%d" % k[1], widths[k[0]]]) for k in order])


def det_scale_for(image_size, det=640):
    """insightface's letterbox scale for a square detector input."""
    w, h = image_size
    new_h = det if h / w > 1.0 else int(det * h / w)
    return new_h / h


def _constant_detector(path, faces, image_size):
    size, n32 = 640, (640 // 32) ** 2 * 2
    scale = det_scale_for(image_size, size)
    score = np.zeros((n32, 1), np.float32)
    bbox = np.zeros((n32, 4), np.float32)
    kpss = np.zeros((n32, 10), np.float32)
    used = set()
    for box, kps, det_score in faces:
        box = np.asarray(box, np.float32) * scale
        kps = np.asarray(kps, np.float32).reshape(5, 2) * scale
        col = int(np.clip(round((box[0] + box[2]) / 64.0), 0, 19))
        row = int(np.clip(round((box[1] + box[3]) / 64.0), 0, 19))
        idx = (row * 20 + col) * 2
        idx += 1 if idx in used else 0
        if idx in used:
            raise ValueError("two constant faces share one detector cell; move them apart")
        used.add(idx)
        anchor = np.array([col * 32.0, row * 32.0], np.float32)
        score[idx] = det_score
        bbox[idx] = np.concatenate([anchor - box[:2], box[2:] - anchor]) / 32.0
        kpss[idx] = ((kps - anchor) / 32.0).reshape(-1)

    g = _Graph()
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])
    nothing = g.op("Mul", g.op("ReduceMean", "input.1", keepdims=0), g.const(0.0))  # depends on the input, = 0
    outs, order = {}, []
    for kind, width, data in (("score", 1, score), ("bbox", 4, bbox), ("kps", 10, kpss)):
        for s in STRIDES:
            n = (size // s) ** 2 * 2
            if s == 32:
                value = g.const(data)
            else:
                value = g.op("ConstantOfShape", g.const([n, width], np.int64))
            outs[(kind, s)] = (g.op("Add", value, nothing), [n, width])
            order.append((kind, s))
    g.save(path, inp, [outs[k] for k in order])


def _pooled_linear(path, in_hw, pool, out_dim, seed):
    """[None,3,in,in] -> AveragePool -> Flatten -> MatMul (fixed random) -> [None,out_dim]."""
    g = _Graph()
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, in_hw, in_hw])
    pooled = g.op("Flatten", g.op("AveragePool", "data", kernel_shape=[pool, pool], strides=[pool, pool]))
    feat = 3 * (in_hw // pool) ** 2
    weight = np.random.default_rng(seed).standard_normal((feat, out_dim)).astype(np.float32) / np.sqrt(feat)
    g.save(path, inp, [(g.op("MatMul", pooled, g.const(weight)), ["None", out_dim])])


def build_pack(root, det="marker", faces=(), image_size=(640, 640), max_cells=None, recognizer_seed=0,
               pack="antelopev2"):
    """Write a fake pack (antelopev2 or buffalo_l) under ``<root>/models/<pack>/``; return that folder."""
    names = PACK_FILES[pack]
    folder = os.path.join(str(root), "models", pack)
    os.makedirs(folder, exist_ok=True)
    det_path = os.path.join(folder, names[0])
    if det == "marker":
        _marker_detector(det_path, max_cells)
    elif det == "constant":
        _constant_detector(det_path, list(faces), image_size)
    else:
        raise ValueError("det must be 'marker' or 'constant'")
    _pooled_linear(os.path.join(folder, names[1]), 112, 8, 512, recognizer_seed)
    _pooled_linear(os.path.join(folder, "2d106det.onnx"), 192, 64, 212, 1)
    _pooled_linear(os.path.join(folder, "1k3d68.onnx"), 192, 64, 3309, 2)
    _pooled_linear(os.path.join(folder, "genderage.onnx"), 96, 32, 3, 3)
    return folder


def marker_kps(cell_x, cell_y, det_scale=1.0):
    """Expected (bbox, kps) in image px for a marker face firing at detector cell (cell_x, cell_y)."""
    x0, y0 = cell_x * 32.0, cell_y * 32.0
    side = MARKER_BOX_CELLS * 32.0
    bbox = np.array([x0, y0, x0 + side, y0 + side], np.float32) / det_scale
    kps = (np.array([x0, y0], np.float32) + ARCFACE_TEMPLATE * (side / 112.0)) / det_scale
    return bbox, kps
