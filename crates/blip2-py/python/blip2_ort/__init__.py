"""BLIP-2 on ONNX Runtime, from Python.

``blip2_ort.Model`` loads an export made by ``blip2-ort export`` (or a checkpoint folder or
Hugging Face Hub id, exported once into the blip2-ort cache) and captions, answers
questions, chats, or embeds and matches images and texts, with exactly the results of the
``blip2-ort infer`` command. ``blip2_ort.export`` is the command's export.
``blip2_ort.ray`` has the callable classes for Ray Data's ``map_batches``.

ONNX Runtime is loaded from the ``onnxruntime`` (or ``onnxruntime-gpu``) wheel installed
beside this package; ``ORT_DYLIB_PATH`` still wins when set, and the library installed by
``blip2-ort install-runtime`` is the last resort.
"""

import importlib.util as _importlib_util
import os as _os

from . import _native
from ._native import ORT_VERSION, Model, __version__, export, runtime_library

__all__ = ["Model", "export", "runtime_library", "ORT_VERSION", "__version__"]


def _wheel_runtime():
    """The ONNX Runtime library of the onnxruntime wheel, found without importing it."""
    try:
        spec = _importlib_util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = _os.path.join(folder, "capi", _native._runtime_library_name())
        if _os.path.isfile(path):
            return path
    return None


_lib = _wheel_runtime()
if _lib is not None:
    _native._prefer_runtime_library(_lib)
