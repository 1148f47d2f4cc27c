"""Image files as the loaders read them: which files are images, and any PIL image as RGB.

One conversion for every reader (an ImageFolder's files, packed shards, ``data check``), so
that the same file gives the same pixels whichever way it is stored.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_SIDE = 4096  # larger images are reduced to this on load (JPEG: decoded at reduced scale)


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot read."""
    from PIL import Image

    return (OSError, SyntaxError, Image.DecompressionBombError)


def load_rgb(fp: IO[bytes]) -> Image.Image:
    """Decode an image file as RGB: grayscale, RGBA, CMYK, palette; very large ones reduced."""
    from PIL import Image

    img: Image.Image = Image.open(fp)
    if max(img.size) > MAX_SIDE:
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
    img.load()
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
