"""Image folders, image I/O, atomic writes, the built-in CIFAR-10 data and the private record.

Modules by job:

- :mod:`.folders`: listing an ImageFolder-style directory (``root/<class>/.../<image>``; the class
  index of a folder is its position among the sorted class folder names) and the entries not read;
- :mod:`.images`: reading images as displayed (:func:`read_image`, :func:`load_rgb`: 8-bit RGB, by
  the policy written in docs/images.md) and :func:`to_batch`, uint8 images to a float batch;
- :mod:`.encoding`: the output formats of a released copy (:class:`OutputFormat`, :func:`encode_png`);
- :mod:`.io`: atomic writes (every file a command writes goes through :func:`atomic_write_bytes`),
  private modes, hashes;
- :mod:`.cifar`: the built-in CIFAR-10 archive;
- :mod:`.record`: reading the private record of a marking run.

Every name is re-exported here: ``from radioactive.data import load_rgb`` keeps working.
"""

import tempfile  # noqa: F401 -- ``data.tempfile``, the module atomic writes create their files with

from .cifar import CIFAR10_ARCHIVE, DATA_ENV, cache_dir, cifar10_subset, default_data_dir, extract_cifar10
from .encoding import OUTPUT_FORMATS, OutputFormat, apply_delta, encode_png
from .folders import IMAGE_EXTENSIONS, ImageFolder, list_image_folder
from .images import (ALPHA_BACKGROUND, MAX_PIXELS, DecodedImage, display_size, load_folder_array, load_rgb,
                     read_image, to_batch)
from .io import (PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, atomic_write_bytes, atomic_writer, make_dirs,
                 read_json, sha256_file)
from .record import RecordEntry, read_record, read_withheld

__all__ = [
    "ALPHA_BACKGROUND", "CIFAR10_ARCHIVE", "DATA_ENV", "IMAGE_EXTENSIONS", "MAX_PIXELS", "OUTPUT_FORMATS",
    "PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "DecodedImage", "ImageFolder", "OutputFormat", "RecordEntry",
    "apply_delta", "atomic_write_bytes", "atomic_writer", "cache_dir", "cifar10_subset", "default_data_dir",
    "display_size", "encode_png", "extract_cifar10", "list_image_folder", "load_folder_array", "load_rgb",
    "make_dirs", "read_image", "read_record", "read_withheld", "sha256_file", "to_batch",
]
