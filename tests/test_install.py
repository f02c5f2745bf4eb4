"""install.py decisions: which pip commands would run, without running pip."""

import importlib.util
import os
import sys
import types

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "instantid_install", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "install.py"))
install = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(install)

NOTHING = {name: None for name in install.DISTRIBUTIONS}
OLD_DEPS = ["flatbuffers", "coloredlogs", "humanfriendly"]


def with_(**versions):
    installed = dict(NOTHING)
    installed.update({k.replace("_", "-"): v for k, v in versions.items()})
    return installed


def test_all_present_does_nothing():
    installed = with_(insightface="2.1", onnx="1.17.0", onnxruntime="1.31.1", flatbuffers="25.1")
    assert install.plan((3, 11), None, installed) == []
    assert install.plan((3, 10), "12.1", installed) == []  # a working CPU runtime is not swapped


def test_nothing_present_cpu_python310():
    assert install.plan((3, 10, 13), None, NOTHING) == [
        ["install", "--no-deps", "insightface==2.1", "onnx==1.17.0", "onnxruntime==1.23.2"] + OLD_DEPS]


def test_nothing_present_cpu_python311_gets_the_newest_runtime():
    assert install.plan((3, 11), None, NOTHING) == [
        ["install", "--no-deps", "insightface==2.1", "onnx==1.17.0", "onnxruntime==1.31.1", "flatbuffers"]]


def test_cuda12_python310():
    assert install.plan((3, 10), "12.1", NOTHING) == [
        ["install", "--no-deps", "insightface==2.1", "onnx==1.17.0", "onnxruntime-gpu==1.23.2"] + OLD_DEPS]


def test_cuda12_python311_stays_below_the_cuda13_builds():
    assert install.plan((3, 11), "12.8", with_(flatbuffers="25.1")) == [
        ["install", "--no-deps", "insightface==2.1", "onnx==1.17.0", "onnxruntime-gpu>=1.22,<1.27",
         "coloredlogs", "humanfriendly"]]


def test_cuda13():
    assert install.plan((3, 12), "13.0", NOTHING) == [
        ["install", "--no-deps", "insightface==2.1", "onnx==1.17.0", "onnxruntime-gpu==1.31.1", "flatbuffers"]]
    requirement, _, note = install.choose_runtime((3, 10), "13.0")  # no cp310 CUDA 13 build exists
    assert requirement == "onnxruntime==1.23.2" and "CPU" in note
    assert install.choose_runtime((3, 11), "11.8")[0] == "onnxruntime==1.31.1"


def test_both_flavours_keep_the_gpu_one_with_cuda():
    installed = with_(insightface="2.1", onnx="1.17.0", onnxruntime="1.31.1", onnxruntime_gpu="1.26.0")
    assert install.plan((3, 11), "12.4", installed) == [
        ["uninstall", "-y", "onnxruntime"],
        ["install", "--no-deps", "--force-reinstall", "onnxruntime-gpu==1.26.0"]]
    assert install.plan((3, 11), None, installed) == [
        ["uninstall", "-y", "onnxruntime-gpu"],
        ["install", "--no-deps", "--force-reinstall", "onnxruntime==1.31.1"]]


def test_old_insightface_is_kept_and_only_the_runtime_added():
    installed = with_(insightface="0.7.3", onnx="1.16.0")
    assert install.plan((3, 10), None, installed) == [["install", "--no-deps", "onnxruntime==1.23.2"] + OLD_DEPS]


def test_a_runtime_left_without_its_package_is_reinstalled():
    installed = with_(insightface="2.1", onnx="1.17.0", onnxruntime_gpu="1.23.2")
    assert install.plan((3, 10), "12.1", installed, runtime_importable=False) == [
        ["install", "--no-deps", "--force-reinstall", "onnxruntime-gpu==1.23.2"]]


def test_run_pip_uses_the_webui_launcher_and_quotes_version_ranges(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda cmd, desc: calls.append(cmd)))
    install.run_pip(["install", "--no-deps", "onnxruntime-gpu>=1.22,<1.27", "flatbuffers"], "x")
    assert calls == ['install --no-deps "onnxruntime-gpu>=1.22,<1.27" flatbuffers']


def test_run_pip_falls_back_to_pip_in_this_interpreter(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "launch", None)  # makes `import launch` fail
    monkeypatch.setattr(install.subprocess, "check_call", lambda args: calls.append(args))
    install.run_pip(["install", "--no-deps", "onnx==1.17.0"], "x")
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "onnx==1.17.0"]]


@pytest.fixture
def fake_env(monkeypatch):
    state = {"installed": dict(NOTHING), "pip": [], "checks": [], "cuda_asked": 0}

    def cuda():
        state["cuda_asked"] += 1
        return None

    monkeypatch.setattr(install, "installed_versions", lambda: state["installed"])
    monkeypatch.setattr(install, "torch_cuda_version", cuda)
    monkeypatch.setattr(install, "module_found", lambda name: True)
    monkeypatch.setattr(install, "run_pip", lambda args, desc: state["pip"].append(args))
    monkeypatch.setattr(install.subprocess, "check_call", lambda args: state["checks"].append(args))
    return state


def test_main_fast_path_touches_nothing(fake_env):
    fake_env["installed"] = with_(insightface="2.1", onnx="1.17.0", onnxruntime="1.31.1")
    install.main()
    assert fake_env["pip"] == [] and fake_env["checks"] == [] and fake_env["cuda_asked"] == 0


def test_main_installs_then_checks_the_imports(fake_env):
    install.main()
    assert fake_env["pip"] == [install.plan(sys.version_info, None, NOTHING)[0]]
    assert fake_env["checks"] == [[sys.executable, "-c", "import insightface, onnx, onnxruntime"]]


def test_main_never_raises_when_pip_fails(fake_env, monkeypatch, capsys):
    def broken(args, desc):
        raise RuntimeError("no network")

    monkeypatch.setattr(install, "run_pip", broken)
    install.main()
    assert "could not install the face analysis packages (no network)" in capsys.readouterr().out


def test_uninstall_never_goes_through_the_webui_launcher(monkeypatch):
    """The webui's launch.run_pip appends --prefer-binary, which 'pip uninstall' rejects."""
    calls = []
    fake_launch = types.SimpleNamespace(run_pip=lambda command, desc: calls.append(("launch", command)))
    monkeypatch.setitem(sys.modules, "launch", fake_launch)
    monkeypatch.setattr(install.subprocess, "check_call", lambda args: calls.append(("subprocess", args[3:])))
    install.run_pip(["uninstall", "-y", "onnxruntime"], "x")
    install.run_pip(["install", "--no-deps", "onnx==1.17.0"], "y")
    assert calls == [("subprocess", ["uninstall", "-y", "onnxruntime"]),
                     ("launch", "install --no-deps onnx==1.17.0")]
