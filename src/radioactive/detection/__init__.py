"""Detection: a family of tests, each with a declared validity, and one audit that combines them.

Every test is registered (:mod:`radioactive.detection.registry`) with the access it needs, the owner's files it
reads, its validity class and its config. :func:`audit` runs every valid test that fits the access to a suspect,
with settings fixed in the owner's audit plan, and combines them with Holm's method into one verdict.
"""

from .registry import ACCESS, PRIVATE_FILES, MethodEntry, get_method, list_methods, register_method  # noqa: F401
from .result import DETAILS, RESULT_SCHEMA, VALIDITIES, DetectionResult  # noqa: F401
from .access import OwnerFiles, SuspectAccess  # noqa: F401

# one import per test module: importing it registers the test
from .whitebox import (Alignment, class_cosines, decoy_log10_pvalues, detect, empirical_log10_pvalue,  # noqa: F401
                       extract_features, fit_alignment, match_classes, pull_back, whitebox_test)
from .gradient import TEMPERATURE, gradient_detect, pulled_back_gradients  # noqa: F401
from .decoys import decoy_carrier_detect, decoy_marks  # noqa: F401
from .blackbox import blackbox_detect, paired_effect  # noqa: F401
from .membership import membership_detect  # noqa: F401
from .labels import labels_detect, write_label_queries  # noqa: F401
from .audit import AuditResult, audit, holm  # noqa: F401
