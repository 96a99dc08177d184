"""Reading suspect files: weights + sidecar (schema checked on load), state dicts read as tensors only,
TorchScript, and the optional timm, Hugging Face and ONNX formats.

- :mod:`.files`: the sidecar (:func:`read_sidecar`, :func:`check_sidecar`) and state dicts (:func:`read_state_dict`);
- :mod:`.load`: :func:`load_suspect` (a :class:`radioactive.networks.FeatureNetwork`) and :func:`load_runnable`
  (anything that runs, for black-box tests);
- :mod:`.extras`: timm, Hugging Face, ONNX, and an architecture name + state dict (:func:`state_dict_suspect`).

The private names re-exported are for :mod:`radioactive.networks`'s old import paths. These names were in :mod:`radioactive.networks` before and are still importable from there.
"""

from .extras import IMAGENET_MEAN, IMAGENET_STD, build_timm, is_hf_folder, load_hf, load_onnx, state_dict_suspect
from .files import (SIDECAR_SCHEMA, _read_state_dict, _strict_load, check_sidecar, nonfinite_tensors,  # noqa: F401
                    read_sidecar, read_state_dict, sidecar_path)
from .load import ScriptedFeatureNetwork, _load_torchscript, _Runnable, load_runnable, load_suspect  # noqa: F401

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SIDECAR_SCHEMA", "ScriptedFeatureNetwork", "build_timm", "check_sidecar",
    "is_hf_folder", "load_hf", "load_onnx", "load_runnable", "load_suspect", "nonfinite_tensors", "read_sidecar",
    "read_state_dict", "sidecar_path", "state_dict_suspect",
]
