"""A small deterministic synthetic catalog, so the whole pipeline runs on a fresh machine with no data or network.

Packaged products come in look-alike boxes shared by two flavours of one brand: only the printed flavour (OCR)
or the title separates them. Produce carries no text at all: only the picture separates it. Some titles are
empty and some name only the brand, so neither stream alone gets every class right.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEMO_DIR = Path("data") / "demo"
IMAGE_SIZE = 224
PER_CLASS = 40
SEED = 20261121

# label -> (brand, flavour, box colour, text colour); two labels per brand share the box.
PACKAGED = {
    "alpro-soya": ("ALPRO", "SOYA", (40, 90, 170), (255, 255, 255)),
    "alpro-oat": ("ALPRO", "OAT", (40, 90, 170), (255, 255, 255)),
    "valio-vanilla": ("VALIO", "VANILLA", (235, 235, 225), (20, 40, 120)),
    "valio-strawberry": ("VALIO", "STRAWBERRY", (235, 235, 225), (20, 40, 120)),
    "oatly-original": ("OATLY", "ORIGINAL", (90, 140, 200), (20, 20, 20)),
    "oatly-chocolate": ("OATLY", "CHOCOLATE", (90, 140, 200), (20, 20, 20)),
    "tropicana-orange": ("TROPICANA", "ORANGE", (250, 170, 30), (20, 90, 30)),
    "tropicana-apple": ("TROPICANA", "APPLE", (250, 170, 30), (20, 90, 30)),
}
# label -> (colour, (width, height) as a fraction of the image, title)
PRODUCE = {
    "red-apple": ((190, 30, 35), (0.55, 0.55), "Red apple"),
    "lime": ((120, 190, 50), (0.45, 0.40), "Lime"),
    "banana": ((240, 215, 60), (0.80, 0.28), "Banana"),
    "tomato": ((225, 60, 40), (0.50, 0.44), "Vine tomato"),
}
CLASSES = list(PACKAGED) + list(PRODUCE)


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled font: the same glyphs on every machine, so the images are byte-identical everywhere.
    return ImageFont.load_default(size=size)


def _background(rng: np.random.Generator) -> Image.Image:
    base = rng.integers(150, 235, size=3)
    noise = rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _packaged(rng: np.random.Generator, brand: str, flavour: str, box: tuple, ink: tuple) -> Image.Image:
    img = _background(rng)
    d = ImageDraw.Draw(img)
    w, h = int(rng.integers(150, 190)), int(rng.integers(170, 205))
    x0, y0 = int(rng.integers(4, IMAGE_SIZE - w - 4)), int(rng.integers(4, IMAGE_SIZE - h - 4))
    shade = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in box)
    d.rectangle([x0, y0, x0 + w, y0 + h], fill=shade, outline=(30, 30, 30), width=2)
    d.text((x0 + 10, y0 + 18), brand, fill=ink, font=_font(30 if len(brand) < 8 else 22))
    d.text((x0 + 10, y0 + 70), flavour, fill=ink, font=_font(26 if len(flavour) < 9 else 20))
    d.rectangle([x0 + 10, y0 + h - 40, x0 + w - 10, y0 + h - 14], fill=ink)  # the brand's stripe
    return img


def _produce(rng: np.random.Generator, colour: tuple, size: tuple) -> Image.Image:
    img = _background(rng)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        w = int(IMAGE_SIZE * size[0] * rng.uniform(0.8, 1.1))
        h = int(IMAGE_SIZE * size[1] * rng.uniform(0.8, 1.1))
        x0, y0 = int(rng.integers(0, IMAGE_SIZE - w)), int(rng.integers(0, IMAGE_SIZE - h))
        c = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
        d.ellipse([x0, y0, x0 + w, y0 + h], fill=c, outline=tuple(v // 2 for v in c), width=2)
    return img


def _title(rng: np.random.Generator, label: str) -> tuple[str, str]:
    """(title, description): empty for some items, brand-only for some packaged ones."""
    r = rng.random()
    if r < 0.25:
        return "", ""
    if label in PRODUCE:
        return PRODUCE[label][2], "Fresh produce, sold by weight."
    brand, flavour = PACKAGED[label][:2]
    if r < 0.55:
        return f"{brand.title()} drink 1 L", "Plant-based and dairy drinks."
    return f"{brand.title()} {flavour.lower()} 1 L", f"{brand.title()} {flavour.lower()}, chilled."


def write_demo_catalog(folder: str | os.PathLike = DEMO_DIR) -> Path:
    """Write the demo catalog (CSV + PNG images) into `folder` once; returns the CSV's path."""
    folder = Path(folder)
    csv_path = folder / "catalog.csv"
    if csv_path.is_file():
        return csv_path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    rows = []
    for label in CLASSES:
        for i in range(PER_CLASS):
            pid = f"{label}-{i:03d}"
            if label in PACKAGED:
                img = _packaged(rng, *PACKAGED[label])
                group = "packaged"
            else:
                img = _produce(rng, *PRODUCE[label][:2])
                group = "produce"
            rel = f"images/{pid}.png"
            img.save(folder / rel, format="PNG", optimize=False)
            title, description = _title(rng, label)
            rows.append(
                {
                    "product_id": pid,
                    "image_path": rel,
                    "title": title,
                    "description": description,
                    "label": label,
                    "group": group,
                }
            )
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_path)  # the CSV appears last, so a killed run regenerates everything
    return csv_path
