"""Unlabeled image folders: every image file under a root, for self-supervised work (ToCom distillation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFiles", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class ImageFiles(Dataset):
    """All images under ``root`` (recursive, sorted), each returned as ``transform(PIL RGB image)``.

    Class sub-folders (ImageNet layout) are fine; labels are not read. Raises ``FileNotFoundError``
    for a missing root, ``ValueError`` for a folder without images, and ``ValueError`` naming the
    file when an image cannot be decoded.
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
        return self.transform(image) if self.transform is not None else image
