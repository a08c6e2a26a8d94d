"""What goes wrong with a dataset: :class:`DataError` names the file, folder or field; :class:`BadImageError`
lists the images that cannot be decoded.
"""
from __future__ import annotations

SPLITS = ("train", "val", "test")


IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


class DataError(ValueError):
    """Bad dataset input: the message names the file, folder or field."""


class BadImageError(DataError):
    """Images that cannot be decoded, with ``on_bad_image: error``."""

    def __init__(self, bad: list[dict[str, str]], where: str) -> None:
        self.bad, self.where = bad, where
        shown = "; ".join(f"{b['path']} ({b['error']})" for b in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        super().__init__(
            f"{len(bad)} image(s) in {where} cannot be decoded: {shown}{more}. "
            "Fix or remove them, or set data.on_bad_image: skip to leave them out"
        )

    @classmethod
    def joined(cls, errors: list[BadImageError]) -> BadImageError:
        """One error naming the bad images of several splits (each split's extraction collects its own)."""
        return cls([b for e in errors for b in e.bad], " and ".join(e.where for e in errors))
