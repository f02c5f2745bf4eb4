"""Installs the face-analysis runtime (insightface, onnx, onnxruntime) into the webui's venv.

The webui runs this file at start. Everything is installed with ``--no-deps`` so pip never touches
the webui's numpy / protobuf / opencv pins, and exactly one onnxruntime flavour is installed:
onnxruntime-gpu matching torch's CUDA major version, else the CPU onnxruntime. An existing,
working insightface (0.7.3 included) is kept. When nothing is missing this does nothing.

The decisions are pure functions of (python version, CUDA version, installed distributions) so
they can be tested without pip; ``main()`` gathers those inputs and runs the commands.
"""

import importlib.util
import subprocess
import sys

INSIGHTFACE = "insightface==2.1"
ONNX = "onnx==1.17.0"
CPU, GPU = "onnxruntime", "onnxruntime-gpu"
# the newest cp310 wheels of both flavours are 1.23.2 (CUDA 12); 1.22-1.26 need CUDA 12, 1.27+ CUDA 13
PY310_ORT = "1.23.2"
NEWEST_ORT = "1.31.1"
CUDA12_GPU_RANGE = ">=1.22,<1.27"
OLD_ORT_DEPS = ("flatbuffers", "coloredlogs", "humanfriendly")  # 1.2x still requires coloredlogs
NEW_ORT_DEPS = ("flatbuffers",)
DISTRIBUTIONS = (INSIGHTFACE.split("==")[0], "onnx", CPU, GPU) + OLD_ORT_DEPS


def choose_runtime(python_version, cuda_version):
    """(requirement, extra deps, note) of the one onnxruntime flavour to install."""
    py310 = tuple(python_version[:2]) <= (3, 10)
    major = int(str(cuda_version).split(".")[0]) if cuda_version else 0
    cpu = (CPU + "==" + (PY310_ORT if py310 else NEWEST_ORT), OLD_ORT_DEPS if py310 else NEW_ORT_DEPS)
    if not major:
        return cpu + ("",)
    if major < 12:
        return cpu + ("onnxruntime-gpu on PyPI needs CUDA 12 or newer (torch has CUDA %s): face analysis "
                      "will run on the CPU." % cuda_version,)
    if py310:
        if major == 12:
            return GPU + "==" + PY310_ORT, OLD_ORT_DEPS, ""
        return cpu + ("there is no onnxruntime-gpu for CUDA %d on Python 3.10: face analysis will run on the CPU "
                      "(Python 3.11+ gets the GPU build)." % major,)
    if major == 12:
        return GPU + CUDA12_GPU_RANGE, OLD_ORT_DEPS, ""
    return GPU + "==" + NEWEST_ORT, NEW_ORT_DEPS, ""


def plan(python_version, cuda_version, installed, runtime_importable=True):
    """pip argument lists to run; ``installed`` maps distribution name -> version or None."""
    have = {name: version for name, version in installed.items() if version}
    requirement, runtime_deps, _ = choose_runtime(python_version, cuda_version)
    chosen = GPU if requirement.startswith(GPU) else CPU
    if CPU in have and GPU in have:  # both write onnxruntime/: remove one, repair the other
        other = CPU if chosen == GPU else GPU
        return [["uninstall", "-y", other],
                ["install", "--no-deps", "--force-reinstall", "%s==%s" % (chosen, have[chosen])]]
    commands, wanted = [], []
    present = CPU if CPU in have else GPU if GPU in have else None
    if present and not runtime_importable:  # left broken, e.g. by uninstalling one of two flavours
        commands.append(["install", "--no-deps", "--force-reinstall", "%s==%s" % (present, have[present])])
    if "insightface" not in have:
        wanted.append(INSIGHTFACE)
    if "onnx" not in have:
        wanted.append(ONNX)
    if present is None:
        wanted.append(requirement)
        wanted += [dep for dep in runtime_deps if dep not in have]
    if wanted:
        commands.append(["install", "--no-deps"] + wanted)
    return commands


def installed_versions(names=DISTRIBUTIONS):
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def torch_cuda_version():
    """torch's CUDA version when torch is a CUDA build and sees a GPU, else None."""
    try:
        import torch

        return torch.version.cuda if torch.version.cuda and torch.cuda.is_available() else None
    except Exception:  # no torch, or a broken driver: the CPU runtime is the safe choice
        return None


def module_found(name):
    return importlib.util.find_spec(name) is not None


def _quote(arg):
    return '"%s"' % arg if any(c in arg for c in "<>|&^ ") else arg


def run_pip(args, desc):
    try:
        import launch  # the webui's launcher: uses its pip options and index settings
    except ImportError:
        launch = None
    # launch.run_pip appends --prefer-binary, which "pip uninstall" refuses
    if launch is not None and hasattr(launch, "run_pip") and args[0] == "install":
        launch.run_pip(" ".join(_quote(a) for a in args), desc)
    else:
        print("[sd-webui-instantid] %s" % desc)
        subprocess.check_call([sys.executable, "-m", "pip"] + list(args))


def main():
    installed = installed_versions()
    runtime_importable = module_found("onnxruntime")
    ready = all(installed[n] for n in ("insightface", "onnx")) and bool(installed[CPU] or installed[GPU])
    if ready and not (installed[CPU] and installed[GPU]) and runtime_importable:
        return  # fast path at every webui start; the import check below runs only after an install
    cuda = torch_cuda_version()
    commands = plan(sys.version_info, cuda, installed, runtime_importable)
    note = choose_runtime(sys.version_info, cuda)[2]
    if note:
        print("[sd-webui-instantid] note: " + note)
    try:
        for args in commands:
            run_pip(args, "sd-webui-instantid: pip " + " ".join(args))
        subprocess.check_call([sys.executable, "-c", "import insightface, onnx, onnxruntime"])
    except Exception as exc:  # never stop the webui from starting; face analysis will explain itself
        print("[sd-webui-instantid] could not install the face analysis packages (%s). Install them by hand in "
              "the webui's venv: pip install --no-deps %s %s %s" % (exc, INSIGHTFACE, ONNX, _quote(
                  choose_runtime(sys.version_info, cuda)[0])))


if __name__ == "__main__":
    main()
