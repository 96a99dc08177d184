"""Old import path, kept as a thin re-export: see :mod:`radioactive.detection.decoys`."""

from .detection.decoys import (DecoyMarks, decoy_carrier_detect, decoy_marks, mirror_statistics,  # noqa: F401
                               record_marking_config)
