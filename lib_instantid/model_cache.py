"""The one model cache: loaded models across generations, and what each file was detected as.

Loaded models are keyed by what makes them different (kind, file, its size and time, device,
dtype), so a replaced file is loaded again. ``clear()`` frees everything; the webui glue calls it
on request and, if the user does not want models kept, after each generation.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Tuple

import torch

from .model_files import weights_path


def file_stamp(path: str) -> Tuple[str, int, float]:
    stat = os.stat(weights_path(path))
    return os.path.realpath(path), stat.st_size, stat.st_mtime


class ModelCache:
    def __init__(self) -> None:
        self._models: "OrderedDict[tuple, Any]" = OrderedDict()
        self._lock = threading.RLock()
        self.detected: Dict[tuple, Any] = {}     # model_files.inspect's cache
        self.loads = 0                            # how many models were actually loaded
        self._results: "OrderedDict[tuple, Any]" = OrderedDict()
        self.computed = 0                         # how many results were actually computed

    def get(self, kind: str, path: str, build: Callable[[], Any], *extra) -> Any:
        key = (kind, file_stamp(path)) + tuple(str(e) for e in extra)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            for old in [k for k in self._models if k[0] == kind and k[1][0] == key[1][0]]:
                del self._models[old]   # the same file on another device/dtype, or an older copy
            model = build()
            self.loads += 1
            self._models[key] = model
            return model

    def remember(self, key: tuple, build: Callable[[], Any], size: int = 64) -> Any:
        """A computed result (an image's encoding, say), kept for the next generations (LRU)."""
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
            value = build()
            self.computed += 1
            self._results[key] = value
            while len(self._results) > size:
                self._results.popitem(last=False)
            return value

    def loaded(self) -> List[str]:
        with self._lock:
            return [f"{k[0]}: {os.path.basename(k[1][0])}" for k in self._models]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._results.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CACHE = ModelCache()
