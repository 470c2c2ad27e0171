#!/usr/bin/env python3
"""Makes the benchmark photos from the project's own photos (scikit-image's bundled set).

    .cache/venv/bin/python scripts/make_photos.py --out .cache/photos [--if-missing]

Writes photo-640x400.jpg (coffee), photo-1920x1080.jpg and photo-4032x3024.jpg (12 MP), JPEG
quality 90 with 4:2:0 chroma as phones write. The larger two are mosaics of the bundled photos
at close to their own resolution rather than one photo blown up: an enlarged photo is smooth,
compresses to a fraction of a real phone photo's bytes and decodes faster than one would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import skimage
from PIL import Image

DATA = Path(skimage.__file__).parent / "data"
TILES = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
    "ihc.png", "logo.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
]
SIZES = {"640x400": (640, 400, 1, 1), "1920x1080": (1920, 1080, 4, 2), "4032x3024": (4032, 3024, 8, 6)}


def mosaic(width: int, height: int, cols: int, rows: int) -> Image.Image:
    if cols == 1:
        return Image.open(DATA / "coffee.png").convert("RGB").resize((width, height), Image.BILINEAR)
    tw, th = width // cols, height // rows
    out = Image.new("RGB", (width, height))
    for i in range(cols * rows):
        tile = Image.open(DATA / TILES[i % len(TILES)]).convert("RGB").resize((tw, th), Image.BILINEAR)
        out.paste(tile, ((i % cols) * tw, (i // cols) * th))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="benchmark photos from scikit-image's bundled set")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--if-missing", action="store_true", help="do nothing when every photo exists")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (w, h, cols, rows) in SIZES.items():
        path = args.out / f"photo-{name}.jpg"
        if args.if_missing and path.exists():
            continue
        mosaic(w, h, cols, rows).save(path, quality=90, subsampling=2)
        print(f"photos: wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
