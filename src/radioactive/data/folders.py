"""Listing image folders (torchvision ``ImageFolder`` layout) and the rules for the entries not read.

Layout convention: ``root/<class>/.../<image>``; the class index of a folder is its position among the
sorted class folder names (docs/images.md).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import RadioactiveError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder.

    Attributes:
        root: the folder holding one sub-folder per class.
        classes: class names in index order (sorted folder names).
        files: (N,) paths relative to ``root``, sorted, as POSIX strings.
        labels: (N,) class index of each file.
        ignored: relative paths of entries that are not read (hidden files,
            other extensions, files outside the class folders, links not
            followed), sorted; listed, never read.
        ignored_reasons: why each entry of ``ignored`` is ignored, in the same order.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    ignored: tuple[str, ...] = ()
    ignored_reasons: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]


class _Lister:
    """Walks the class folders of one listing; see :func:`list_image_folder` for the rules."""

    def __init__(self, root: Path):
        self.root, self.root_real = root, root.resolve()
        self.files: list[str] = []
        self.labels: list[int] = []
        self.ignored: list[tuple[str, str]] = []
        self.walked: set[Path] = set()

    def rel(self, p: str | Path) -> str:
        return Path(p).relative_to(self.root).as_posix()

    def ignore_tree(self, path: Path, reason: str) -> None:
        """List ``path`` (a file, a link, or every file and link under a folder) as ignored; links are not followed."""
        if path.is_symlink() or not path.is_dir():
            self.ignored.append((self.rel(path), reason))
            return
        for dirpath, dirnames, filenames in os.walk(path, onerror=lambda e: self.ignored.append(
                (self.rel(e.filename), f"{reason}; cannot list this folder ({e.strerror})"))):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                self.ignored.append((self.rel(os.path.join(dirpath, name)), reason))

    def walk(self, folder: Path, label: int) -> None:
        """List the images under ``folder`` (at any depth) as class ``label``."""
        self.walked.add(folder.resolve())
        prefix = self.rel(folder) + "/"
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.ignored.append((prefix, f"cannot list this folder ({e.strerror})"))
            return
        for e in entries:
            rel = prefix + e.name
            if e.name.startswith("."):
                self.ignore_tree(Path(e.path), "hidden")
                continue
            link = e.is_symlink()
            if link:
                try:
                    mode = os.stat(e.path).st_mode  # the target's
                except (OSError, RuntimeError):  # RuntimeError: a link loop before Python 3.13
                    self.ignored.append((rel, "broken symbolic link"))
                    continue
                is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
            else:  # from the folder listing, no system call
                is_dir, is_file = e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)
            if is_dir:
                real = Path(e.path).resolve()
                if link and real.is_relative_to(self.root_real):
                    why = "link to a folder inside the image folder, not followed (its files are listed where they are)"
                    self.ignored.append((rel, why))
                elif real in self.walked:
                    self.ignored.append((rel, "link to a folder already listed (a loop), not followed"))
                else:
                    self.walk(Path(e.path), label)
            elif not is_file:
                self.ignored.append((rel, "not a regular file"))
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                self.ignored.append((rel, "not an image extension"))
            else:
                self.files.append(rel)
                self.labels.append(label)


def list_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List an ImageFolder-style directory, accounting for every entry.

    Rules (docs/images.md):

    - classes are the non-hidden sub-folders of ``root`` (links to folders
      count), sorted by name;
    - every file under a class folder, at any depth, belongs to that class;
    - an image is a regular file (links to files are followed) whose name is
      not hidden and ends with one of :data:`IMAGE_EXTENSIONS`, in any case;
      its content, not its extension, decides how it is decoded;
    - a link to a folder outside ``root`` is followed, each real folder once
      (no loops); a link to a folder inside ``root`` is not followed, since
      that folder's files are listed where they are;
    - everything else is listed in ``ignored`` with a reason and never read:
      hidden files and every file of hidden folders, other extensions, files
      directly in ``root``, broken links, links not followed, special files.

    Args:
        root: folder with one sub-folder per class.
        classes: expected class names in order; when given, the folder's class
            names must match them exactly.

    Raises:
        RadioactiveError: the folder does not exist, has no class folders, a
            class folder holds no image, or its classes differ from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RadioactiveError(f"image folder not found: {root} (expected a folder with one sub-folder per class)")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    found = [p.name for p in entries if not p.name.startswith(".") and p.is_dir()]
    if not found:
        raise RadioactiveError(f"{root} has no class sub-folders (expected the ImageFolder layout root/<class>/<image>)")
    if classes is not None and tuple(found) != tuple(classes):
        raise RadioactiveError(
            f"classes of {root} differ from the expected ones: found {found[:5]}..., expected {list(classes)[:5]}..."
        )
    lister = _Lister(root)
    for p in entries:
        if p.name not in found:
            lister.ignore_tree(p, "hidden" if p.name.startswith(".") else "not inside a class folder")
    for k, name in enumerate(found):
        n_before = len(lister.files)
        lister.walk(root / name, k)
        if len(lister.files) == n_before:
            raise RadioactiveError(f"class folder {root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    order = sorted(range(len(lister.files)), key=lister.files.__getitem__)
    ignored = sorted(lister.ignored)
    return ImageFolder(
        root=root,
        classes=tuple(found),
        files=tuple(lister.files[i] for i in order),
        labels=tuple(lister.labels[i] for i in order),
        ignored=tuple(r for r, _ in ignored),
        ignored_reasons=tuple(why for _, why in ignored),
    )
