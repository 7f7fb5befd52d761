"""Real photos for augmentation and evaluation tests, from images that installed packages ship.

matplotlib's sample data holds a photograph (``grace_hopper.jpg``, 512 x 600) and a product
photo (``Minduka_Present_Blue_Pack.png``, 128 x 128, RGBA). :func:`photos` cuts and rescales
them into photos of several sizes and aspect ratios (tall, wide, tiny, large, square);
:func:`photo_folder` writes an ImageNet-layout folder of them as JPEG and PNG files.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from PIL import Image

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"


def _sources() -> list[Image.Image]:
    with Image.open(SAMPLE_DATA / "grace_hopper.jpg") as hopper:
        hopper = hopper.convert("RGB")
    with Image.open(SAMPLE_DATA / "Minduka_Present_Blue_Pack.png") as pack:
        pack = pack.convert("RGB")
    return [hopper, pack]


def photos(mode: str = "RGB") -> list[Image.Image]:
    """Nine real photos in ``mode``: (width, height) from 37 x 23 up to 900 x 1054, aspect
    ratios from 1:3 to 3:1."""
    hopper, pack = _sources()
    result = [
        hopper,  # 512 x 600
        hopper.crop((0, 100, 512, 270)),  # wide 3:1
        hopper.crop((150, 0, 330, 540)),  # tall 1:3
        hopper.resize((900, 1054), Image.BICUBIC),  # large
        hopper.resize((37, 23), Image.BICUBIC),  # tiny, wide
        hopper.crop((100, 200, 400, 425)),  # 4:3
        pack,  # 128 x 128
        pack.resize((300, 200), Image.BICUBIC),  # 3:2
        pack.crop((10, 20, 60, 120)),  # 1:2, small
    ]
    return [image.convert(mode) for image in result]


def photo_folder(root: Path, *, classes: int, train_per_class: int, val_per_class: int) -> Path:
    """``root/{train,val}/class_<c>/*.{jpg,png}``: the photos, mirrored and rotated per sample
    so that files differ. Returns ``root``."""
    images = photos()
    number = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                image = images[number % len(images)]
                if number // len(images) % 2:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
                image = image.rotate(7 * (number % 5))
                suffix = "png" if number % 4 == 3 else "jpg"
                image.save(folder / f"{number:04d}.{suffix}")
                number += 1
    return root
