"""webui modules/paths_internal.py: ``models_path`` (``--models-dir`` or ``<data_path>/models``)."""
import os
import tempfile

data_path = os.environ.get("INSTANTID_TEST_WEBUI_DATA", tempfile.mkdtemp(prefix="webui-data-"))
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
script_path = data_path
