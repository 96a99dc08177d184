"""Marking: the per-image optimisation (:mod:`.optimise`) and its pixel weight (:mod:`.calibrate`), folder
marking (:mod:`.folder`, planned by :mod:`.plan`, every mark verified on disk by :mod:`.verify`, summed up by
:mod:`.summary`), its safe, resumable writing (:mod:`.resume`), its spreading
over torchrun processes (:mod:`.distributed`) and its progress bar and metrics (:mod:`.progress`)."""

from .calibrate import LambdaCalibration, calibrate_lambda_img
from .distributed import Ranks, from_env
from .folder import MarkSummary, mark_folder
from .optimise import (
    MARKING_PRESETS, MarkingConfig, carrier_shifts, enforce_min_psnr, image_generator, mark_batch, psnr_db,
)
from .plan import COPY_CHUNK, RECORD_SCHEMA, Unit, check_output_dir, output_name, plan_units, select_holdout, select_marked

__all__ = [
    "COPY_CHUNK", "MARKING_PRESETS", "RECORD_SCHEMA", "LambdaCalibration", "MarkSummary", "MarkingConfig", "Ranks", "Unit",
    "calibrate_lambda_img", "carrier_shifts", "enforce_min_psnr",
    "check_output_dir", "from_env",
    "image_generator", "mark_batch", "mark_folder", "output_name", "plan_units", "psnr_db", "select_holdout",
    "select_marked",
]
