"""radioactive: mark an image dataset and detect, with a p-value you can defend, models trained on it.

Implements "Radioactive data: tracing through training" (Sablayrolles, Douze, Schmid, Jegou, ICML 2020).

The public API in one import (loaded on first use)::

    from radioactive import generate_key, mark_folder, audit_vault, SuspectAccess

    key = generate_key(classes, seed=1)
    mark_folder("train/", key, "release/train", vault="vault/", fraction=0.1)
    verdict = audit_vault("vault/", SuspectAccess.of_model("suspect.safetensors"))
"""

__version__ = "0.1.0"

_API = {
    "Key": "keys", "generate_key": "keys",
    "mark_folder": "marking", "MarkingConfig": "marking", "MARKING_PRESETS": "marking",
    "calibrate_lambda_img": "marking",
    "audit": "detection", "audit_vault": "detection.audit", "AuditResult": "detection",
    "detect": "detection", "gradient_detect": "detection", "decoy_carrier_detect": "detection",
    "blackbox_detect": "detection", "paired_effect": "detection", "membership_detect": "detection",
    "DetectionResult": "detection", "SuspectAccess": "detection", "OwnerFiles": "detection",
    "list_methods": "detection", "get_method": "detection",
    "open_vault": "vault",
    "train": "training", "TrainConfig": "training",
    "run_demo": "demo", "DemoConfig": "demo",
    "RadioactiveError": "errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
