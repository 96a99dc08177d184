"""Old import path, kept as a thin re-export: see :mod:`radioactive.detection.blackbox`,
:mod:`radioactive.detection.membership`, :mod:`radioactive.detection.outputs` and :mod:`radioactive.data.record`."""

from .detection.blackbox import blackbox_detect, control_test, marked_losses, paired_effect  # noqa: F401
from .detection.membership import membership_detect, membership_test  # noqa: F401
from .detection.outputs import (default_mirror_dir, mirror_image, model_outputs, outputs_of,  # noqa: F401
                                read_outputs_file, true_class_loss, write_mirror_images)
from .data.record import RecordEntry, read_record, read_withheld  # noqa: F401
