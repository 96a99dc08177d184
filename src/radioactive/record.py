"""Old import path, kept as a re-export: see :mod:`radioactive.data.record`."""

from .data.record import RecordEntry, read_record, read_withheld  # noqa: F401
