"""Face analysis on synthetic antelopev2 packs, through the real insightface + onnxruntime code."""

import importlib
import logging
import os
import socket
import sys

import cv2
import numpy as np
import pytest

from lib_instantid.errors import FaceAnalysisError
from lib_instantid.face_analysis import (
    FaceAnalyzer,
    align_face_crop,
    check_antelopev2,
    select_face,
)
from lib_instantid.kps import COLORS, draw_kps, fit_kps, kps_map_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # face_pack, under any import mode
try:
    import insightface  # noqa: F401
    import onnxruntime
    from face_pack import (ARCFACE_TEMPLATE, ASTRONAUT_BOX, ASTRONAUT_KPS, build_pack, det_scale_for,
                           marker_kps)

    CUDA_IN_ORT = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
except ImportError:  # the keypoint tests still run
    insightface = None
    CUDA_IN_ORT = False
needs_insightface = pytest.mark.skipif(insightface is None, reason="insightface/onnxruntime not installed")

RED = (255, 0, 0)


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch):
    """~/.insightface must never be written, and nothing may go to the network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("network access attempted: %r" % (args,))

    if insightface is not None:
        for module in ("insightface.utils.download", "insightface.utils.storage"):  # by name: the package
            monkeypatch.setattr(importlib.import_module(module), "download_file", refuse)  # shadows download
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield calls
    assert calls == []
    assert not (home / ".insightface").exists()


@pytest.fixture(scope="module")
def marker_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("marker")
    build_pack(root, det="marker", max_cells=5)
    return str(root)


@pytest.fixture(scope="module")
def marker(marker_root):
    return FaceAnalyzer(marker_root)


def red_squares(*boxes, size=(640, 640)):
    img = np.zeros((size[1], size[0], 3), np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = RED
    return img


# -- detection -------------------------------------------------------------------------------------
@needs_insightface
def test_blank_image_has_no_face_and_the_product_error_says_so(marker):
    blank = np.zeros((480, 640, 3), np.uint8)
    assert marker.detect(blank) == []
    with pytest.raises(FaceAnalysisError, match="No face was detected in the reference image"):
        marker.analyze(blank)


@needs_insightface
def test_one_face_exact_box_kps_and_embedding(marker):
    face = select_face(marker.detect(red_squares((96, 64, 160, 128))))
    bbox, kps = marker_kps(3, 2)
    np.testing.assert_allclose(face.bbox, bbox, atol=1e-3)
    np.testing.assert_allclose(face.kps, kps, atol=1e-3)
    assert face.det_score > 0.99 and marker.last_det_size == (640, 640)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) > 1.5  # raw, not normalised
    assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        face.embedding[0] = 1.0  # cached results are read-only


@needs_insightface
def test_image_is_converted_to_bgr_for_insightface(marker):
    # the detector sees RGB after insightface's own BGR->RGB swap: red is a face, blue is not
    blue = np.zeros((640, 640, 3), np.uint8)
    blue[64:128, 96:160] = (0, 0, 255)
    assert marker.detect(blue) == []
    assert len(marker.detect(red_squares((96, 64, 160, 128)))) == 1


@needs_insightface
def test_several_faces_selection_largest_and_left_to_right(tmp_path):
    # constant detector: a small face on the right listed first, a large one on the left
    small = ([400, 100, 460, 170], [[415, 125], [445, 125], [430, 140], [418, 155], [442, 155]], 0.95)
    large = ([60, 200, 260, 430], [[110, 280], [210, 280], [160, 330], [120, 380], [200, 380]], 0.90)
    build_pack(tmp_path, det="constant", faces=[small, large], image_size=(640, 480))
    faces = FaceAnalyzer(str(tmp_path)).detect(np.full((480, 640, 3), 90, np.uint8))
    assert len(faces) == 2
    np.testing.assert_allclose(select_face(faces).bbox, large[0], atol=1e-3)
    np.testing.assert_allclose(select_face(faces, None).bbox, large[0], atol=1e-3)
    np.testing.assert_allclose(select_face(faces, 0).bbox, large[0], atol=1e-3)
    np.testing.assert_allclose(select_face(faces, "1").bbox, small[0], atol=1e-3)
    with pytest.raises(FaceAnalysisError, match=r"Face number 2 .* has 2 face\(s\)"):
        select_face(faces, 2)
    with pytest.raises(FaceAnalysisError, match="Unknown face choice"):
        select_face(faces, "biggest")
    with pytest.raises(FaceAnalysisError, match="No face was detected"):
        select_face([], 0)


@needs_insightface
def test_two_markers_index_order_and_identical_faces_embed_alike(marker):
    faces = marker.detect(red_squares((384, 320, 448, 384), (64, 64, 128, 128)))
    assert len(faces) == 2
    assert select_face(faces, 0).bbox[0] == pytest.approx(64.0)
    assert select_face(faces, 1).bbox[0] == pytest.approx(384.0)
    a, b = (f.normed_embedding for f in faces)
    assert float(a @ b) == pytest.approx(1.0, abs=1e-4)  # same content, same aligned crop


@needs_insightface
def test_det_size_fallback_finds_a_face_too_large_for_640(marker):
    # the marker detector (max_cells=5) misses red blocks 5+ cells wide, like SCRFD misses huge faces
    img = red_squares((128, 128, 384, 384))
    faces = marker.detect(img)
    assert [s[0] for s in marker.det_sizes_tried] == [640, 576, 512, 448, 384, 320]
    assert marker.last_det_size == (320, 320) and len(faces) == 1
    bbox, kps = marker_kps(2, 2, det_scale=0.5)  # 4 cells wide at 320: found, box back in image px
    np.testing.assert_allclose(faces[0].bbox, bbox, atol=1e-3)
    np.testing.assert_allclose(faces[0].kps, kps, atol=1e-3)


@needs_insightface
def test_static_detector_is_tried_once(tmp_path):
    build_pack(tmp_path, det="constant", faces=[], image_size=(640, 640))
    analyzer = FaceAnalyzer(str(tmp_path))
    assert analyzer.detect(np.zeros((640, 640, 3), np.uint8)) == []
    assert analyzer.det_sizes_tried == [(640, 640)]


# -- cache -----------------------------------------------------------------------------------------
@needs_insightface
def test_results_are_cached_by_pixels(marker_root):
    analyzer = FaceAnalyzer(marker_root, cache_size=2)
    img = red_squares((96, 64, 160, 128))
    first = analyzer.detect(img)
    assert analyzer.runs == 1
    assert analyzer.detect(img.copy()) == first and analyzer.runs == 1  # same pixels, new array
    analyzer.detect(red_squares((96, 96, 160, 160)))
    assert analyzer.runs == 2
    analyzer.detect(img[:320])  # same bytes prefix, other shape
    assert analyzer.runs == 3
    analyzer.detect(img)  # evicted (LRU of 2)
    assert analyzer.runs == 4


# -- model folder checks ---------------------------------------------------------------------------
def test_missing_folder_is_reported_before_insightface_runs(tmp_path):
    with pytest.raises(FaceAnalysisError) as err:
        FaceAnalyzer(str(tmp_path / "insightface")).detect(np.zeros((64, 64, 3), np.uint8))
    expected = os.path.join(str(tmp_path / "insightface"), "models", "antelopev2")
    assert "does not exist" in str(err.value) and expected in str(err.value)
    assert "scrfd_10g_bnkps.onnx" in str(err.value)
    assert not (tmp_path / "insightface" / "models").exists()  # insightface's downloader never ran


def test_empty_folder(tmp_path):
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(FaceAnalysisError, match="is empty") as err:
        check_antelopev2(str(tmp_path))
    assert os.path.join(str(tmp_path), "models", "antelopev2") in str(err.value)


@needs_insightface
def test_nested_folder_says_move_files_up(tmp_path):
    inner = build_pack(tmp_path / "tmp")
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.parent.mkdir(parents=True)
    os.rename(inner, str(nested))
    with pytest.raises(FaceAnalysisError, match="move the .onnx files up one level into") as err:
        FaceAnalyzer(str(tmp_path)).detect(np.zeros((64, 64, 3), np.uint8))
    assert os.path.join(str(tmp_path), "models", "antelopev2") + os.sep in str(err.value)


@needs_insightface
def test_missing_files_are_listed_by_name_and_optional_ones_are_not_needed(tmp_path):
    folder = build_pack(tmp_path)
    for name in ("2d106det.onnx", "1k3d68.onnx", "genderage.onnx"):
        os.remove(os.path.join(folder, name))
    assert check_antelopev2(str(tmp_path)) == folder
    assert len(FaceAnalyzer(str(tmp_path)).detect(red_squares((96, 64, 160, 128)))) == 1
    os.remove(os.path.join(folder, "glintr100.onnx"))
    with pytest.raises(FaceAnalysisError, match=r"missing glintr100\.onnx\)") as err:
        check_antelopev2(str(tmp_path))
    assert "scrfd_10g_bnkps.onnx," not in str(err.value).split("missing")[1].split(")")[0]


@needs_insightface
def test_corrupt_model_file_becomes_a_clear_error(tmp_path):
    folder = build_pack(tmp_path)
    with open(os.path.join(folder, "scrfd_10g_bnkps.onnx"), "wb") as fh:
        fh.write(b"<html>not a model</html>")
    with pytest.raises(FaceAnalysisError, match="could not be loaded") as err:
        FaceAnalyzer(str(tmp_path)).detect(np.zeros((64, 64, 3), np.uint8))
    assert folder in str(err.value)


@needs_insightface
def test_an_antelopev2_folder_in_the_cwd_is_ignored(tmp_path, marker_root, monkeypatch):
    build_pack(tmp_path / "cwd" / "models", det="constant", faces=[])  # writes cwd/models/models/antelopev2
    os.rename(str(tmp_path / "cwd" / "models" / "models" / "antelopev2"), str(tmp_path / "cwd" / "antelopev2"))
    monkeypatch.chdir(tmp_path / "cwd")
    analyzer = FaceAnalyzer(marker_root)
    assert len(analyzer.detect(red_squares((96, 64, 160, 128)))) == 1
    assert analyzer.det_sizes_tried == [(640, 640)]


# -- providers -------------------------------------------------------------------------------------
@needs_insightface
def test_cpu_by_default_without_warning(marker_root, caplog):
    analyzer = FaceAnalyzer(marker_root)
    with caplog.at_level(logging.INFO, logger="instantid"):
        analyzer.detect(np.zeros((64, 64, 3), np.uint8))
    assert analyzer.providers_used == ("CPUExecutionProvider",)
    assert "detection runs on CPUExecutionProvider" in caplog.text
    assert not [r for r in caplog.records if r.name == "instantid" and r.levelno >= logging.WARNING]


@needs_insightface
@pytest.mark.skipif(CUDA_IN_ORT, reason="CUDA present")
def test_cuda_request_falls_back_to_cpu_with_a_warning(marker_root, caplog):
    analyzer = FaceAnalyzer(marker_root, device="cuda")
    with caplog.at_level(logging.INFO, logger="instantid"):
        assert len(analyzer.detect(red_squares((96, 64, 160, 128)))) == 1
    assert analyzer.providers_used == ("CPUExecutionProvider",)
    warnings = [r.getMessage() for r in caplog.records if r.name == "instantid" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA" in warnings[0] and "onnxruntime-gpu" in warnings[0]


def test_unknown_device_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        FaceAnalyzer(str(tmp_path), device="tpu")


# -- a real face -----------------------------------------------------------------------------------
@needs_insightface
def test_astronaut_real_landmarks_and_aligned_crop(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    image = skdata.astronaut()
    build_pack(tmp_path, det="constant", faces=[(ASTRONAUT_BOX, ASTRONAUT_KPS, 0.98)], image_size=(512, 512))
    analyzer = FaceAnalyzer(str(tmp_path))
    face = analyzer.analyze(image)
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=1e-3)
    np.testing.assert_allclose(face.bbox, ASTRONAUT_BOX, atol=1e-3)
    assert face.det_score == pytest.approx(0.98)
    assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-5)

    marked = image.copy()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), color in zip(ASTRONAUT_KPS.astype(int), colors):
        marked[y - 3:y + 4, x - 3:x + 4] = color
    crop = align_face_crop(marked, face, size=224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # where a least-squares similarity (our own fit) sends each keypoint in a 224 crop
    a = np.zeros((10, 4))
    a[0::2] = np.c_[ASTRONAUT_KPS[:, 0], -ASTRONAUT_KPS[:, 1], np.ones(5), np.zeros(5)]
    a[1::2] = np.c_[ASTRONAUT_KPS[:, 1], ASTRONAUT_KPS[:, 0], np.zeros(5), np.ones(5)]
    p, q, tx, ty = np.linalg.lstsq(a, (ARCFACE_TEMPLATE * 2).reshape(-1), rcond=None)[0]
    expected = ASTRONAUT_KPS @ np.array([[p, q], [-q, p]]) + [tx, ty]
    for color, target in zip(colors, expected):
        ys, xs = np.nonzero(np.all(np.abs(crop.astype(int) - color) < 40, axis=-1))
        assert len(xs) > 20, color  # the dot survived in its RGB colour
        assert np.hypot(xs.mean() - target[0], ys.mean() - target[1]) < 2.0, color

    with pytest.raises(ValueError):
        align_face_crop(image, face, size=200)
    assert det_scale_for((512, 512)) == 1.25


# -- keypoint map ----------------------------------------------------------------------------------
SPREAD_KPS = np.array([[50, 50], [250, 50], [150, 100], [70, 180], [230, 180]], np.float32)


def test_draw_kps_size_point_colours_and_background():
    img = draw_kps(300, 220, SPREAD_KPS)
    assert img.shape == (220, 300, 3) and img.dtype == np.uint8
    for (x, y), color in zip(SPREAD_KPS.astype(int), COLORS):
        assert tuple(img[y, x]) == color
        assert tuple(img[y + 9, x]) == color and tuple(img[y, x - 9]) == color  # radius 10, filled
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[219, 150]) == (0, 0, 0)
    assert tuple(img[50, 50 + 12]) != COLORS[0]  # no bigger than radius 10 (off the limb direction)


def test_draw_kps_limbs_use_first_point_colour_dimmed_and_stick_width_4():
    img = draw_kps(300, 220, SPREAD_KPS)
    nose = SPREAD_KPS[2]
    for start in (0, 1, 3, 4):
        dim = tuple(153 if c else 0 for c in COLORS[start])  # 255 * 0.6, colour of the limb's first point
        mid = (SPREAD_KPS[start] + nose) / 2
        assert tuple(img[int(mid[1]), int(mid[0])]) == dim
        ys, xs = np.nonzero(np.all(img == dim, axis=-1))
        direction = (nose - SPREAD_KPS[start]) / np.linalg.norm(nose - SPREAD_KPS[start])
        across = np.abs((np.c_[xs, ys] - SPREAD_KPS[start]) @ [-direction[1], direction[0]])
        assert 3.9 < across.max() < 4.9  # half thickness = stickwidth 4 (pixel rounding aside)
        along = (np.c_[xs, ys] - SPREAD_KPS[start]) @ direction
        assert along.min() > 9 and along.max() < np.linalg.norm(nose - SPREAD_KPS[start]) - 9  # under the dots


def test_draw_kps_any_size_and_points_off_canvas():
    big = draw_kps(1536, 1024, SPREAD_KPS * 4)
    assert big.shape == (1024, 1536, 3) and tuple(big[400, 600]) == COLORS[2]
    off = draw_kps(64, 64, SPREAD_KPS + 1000)
    assert off.shape == (64, 64, 3) and not off.any()
    with pytest.raises(ValueError):
        draw_kps(64, 64, SPREAD_KPS[:4])
    with pytest.raises(ValueError):
        draw_kps(0, 64, SPREAD_KPS)


def test_fit_kps_landscape_and_portrait_targets():
    kps = np.array([[0, 0], [512, 512], [256, 256], [128, 384], [384, 128]], np.float32)
    land = fit_kps(kps, 512, 512, 1024, 768)  # scale 2, crop 128 px top and bottom
    np.testing.assert_allclose(land[:3], [[0, -128], [1024, 896], [512, 384]])
    port = fit_kps(kps, 512, 512, 768, 1024)  # scale 2, crop 128 px left and right
    np.testing.assert_allclose(port[:3], [[-128, 0], [896, 1024], [384, 512]])
    wide_to_tall = fit_kps(kps, 800, 400, 400, 800)  # scale 2, 600 px cut each side
    np.testing.assert_allclose(wide_to_tall[2], [256 * 2 - 600, 512])
    np.testing.assert_allclose(fit_kps(kps, 640, 480, 640, 480), kps)
    down = fit_kps(kps, 1024, 1024, 512, 384)  # shrinking works the same way
    np.testing.assert_allclose(down[2], [128, 64])


def test_fit_kps_matches_a_real_crop_and_resize():
    src = np.zeros((300, 500, 3), np.uint8)
    kps = np.array([[120, 80], [380, 90], [250, 150], [160, 240], [340, 230]], np.float32)
    for x, y in kps.astype(int):
        src[y - 2:y + 3, x - 2:x + 3] = 255
    dst_w, dst_h = 384, 512
    scale = max(dst_w / 500, dst_h / 300)
    resized = cv2.resize(src, (round(500 * scale), round(300 * scale)), interpolation=cv2.INTER_AREA)
    x0 = (resized.shape[1] - dst_w) // 2
    crop = resized[:dst_h, x0:x0 + dst_w]
    fitted = fit_kps(kps, 500, 300, dst_w, dst_h)
    for x, y in fitted:
        if 0 <= x < dst_w and 0 <= y < dst_h:
            win = crop[int(y) - 6:int(y) + 7, int(x) - 6:int(x) + 7, 0].astype(float)
            ys, xs = np.nonzero(win > 60)
            assert len(xs), (x, y)
            cx = int(x) - 6 + (xs * win[ys, xs]).sum() / win[ys, xs].sum()
            cy = int(y) - 6 + (ys * win[ys, xs]).sum() / win[ys, xs].sum()
            assert abs(cx - x) < 1.5 and abs(cy - y) < 1.5
    assert sum(0 <= x < dst_w for x, _ in fitted) == 3  # the outer points were cropped away


def test_kps_map_for_draws_at_fitted_points():
    kps = np.array([[100, 100], [200, 100], [150, 150], [110, 200], [190, 200]], np.float32)
    img = kps_map_for(kps, (300, 300), (900, 600))
    assert img.shape == (600, 900, 3)
    x, y = fit_kps(kps, 300, 300, 900, 600)[2]
    assert tuple(img[int(y), int(x)]) == COLORS[2]


@needs_insightface
def test_buffalo_l_pack_for_faceid(tmp_path):
    from lib_instantid.face_analysis import check_pack
    build_pack(tmp_path, det="constant", faces=[(ASTRONAUT_BOX, ASTRONAUT_KPS, 0.98)], image_size=(512, 512),
               pack="buffalo_l", recognizer_seed=5)
    assert check_pack(str(tmp_path), "buffalo_l").endswith(os.path.join("models", "buffalo_l"))
    with pytest.raises(FaceAnalysisError, match="antelopev2 face model folder .* does not exist"):
        check_pack(str(tmp_path), "antelopev2")
    from skimage import data
    face = FaceAnalyzer(str(tmp_path), pack="buffalo_l").analyze(data.astronaut())
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=1e-3)
    assert face.embedding.shape == (512,)
