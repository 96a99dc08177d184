"""Old import path, kept as a thin re-export: see :mod:`radioactive.detection.gradient`."""

from .detection.gradient import (TEMPERATURE, TEMPERATURE_RANGE, _batches, gradient_detect,  # noqa: F401
                                 gradient_pvalues, gradient_statistic, pulled_back_gradients)
