"""Training augmentation on real photos: every op RandAugment can draw, at every magnitude the
recipes can reach, gives an image (posterize with 0 bits gives black, as the reference pipeline
did), draws exactly what timm's RandAugment draws, and every shipped recipe's training transform
survives 5,000 samples of real photos of several sizes and aspect ratios."""

from __future__ import annotations

import random
from pathlib import Path

import numpy
import pytest
import torch
from photos import photos
from PIL import Image
from timm.data import auto_augment

from cskd.config import load_config
from cskd.data import TrainTransform, posterize, rand_augment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(path for path in CONFIGS.rglob("*.yaml") if not path.name.startswith("_"))
HPARAMS = {"translate_const": 100, "img_mean": (124, 116, 104)}


def seed_all(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("bits", [-8, 0])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_without_bits_gives_a_black_image(bits, mode):
    image = photos(mode)[0]
    result = posterize(image, bits)
    assert result.mode == mode and result.size == image.size
    assert numpy.asarray(result).max() == 0


@pytest.mark.parametrize("bits", [1, 4, 7, 8])
def test_posterize_with_bits_keeps_the_high_bits(bits):
    image = photos()[0]
    pixels = numpy.asarray(image)
    mask = 0xFF & ~(2 ** (8 - bits) - 1)
    assert numpy.array_equal(numpy.asarray(posterize(image, bits)), pixels & mask)


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m10-n3"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_randaugment_op_survives_its_extreme_magnitudes(config, mode):
    hparams = dict(HPARAMS, img_mean=HPARAMS["img_mean"] if mode == "RGB" else 115)
    ops = rand_augment(config, hparams).ops
    assert len(ops) >= 14
    images = [image.resize((64, 48)) for image in photos(mode)[:3]] + [photos(mode)[4]]
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0.0  # always applied, at exactly op.magnitude
        for magnitude in (0.0, 10.0):
            op.magnitude = magnitude
            for image in images:
                for repeat in range(2):  # both signs of the signed ops
                    seed_all(repeat)
                    result = op(image)
                    assert isinstance(result, Image.Image), (op.name, magnitude)
                    assert (result.mode, result.size) == (image.mode, image.size), op.name
    names = {op.name for op in ops}
    assert names & {"Posterize", "PosterizeIncreasing"}, "the posterize op is exercised"


def test_posterize_at_its_extreme_gives_black_inside_randaugment():
    ops = {op.name: op for op in rand_augment("rand-m9-mstd0.5-inc1", HPARAMS).ops}
    op = ops["PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0  # 4 - 4 = 0 bits
    assert numpy.asarray(op(photos()[0])).max() == 0


def test_rand_augment_draws_exactly_what_timms_draws():
    """Same seed, same image, same output wherever timm's own op does not raise; where it
    raises (0 bits on this Pillow) ours gives a result and the next draws still match."""
    ours = rand_augment("rand-m9-mstd0.5-inc1", HPARAMS)
    stock = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", HPARAMS)
    image = photos()[5].resize((40, 30))
    compared = raised = 0
    for sample in range(3000):
        seed_all(sample)
        try:
            expected = numpy.asarray(stock(image))
        except ValueError:
            raised += 1
            after_stock = None
        else:
            after_stock = (random.random(), numpy.random.rand())
        seed_all(sample)
        result = numpy.asarray(ours(image))
        after_ours = (random.random(), numpy.random.rand())
        if after_stock is not None:
            assert numpy.array_equal(result, expected), sample
            assert after_ours == after_stock, sample  # the same random numbers were consumed
            compared += 1
    assert compared > 2900


def _transform_key(path: Path) -> tuple:
    config = load_config(path)
    a, d = config.augment, config.data
    return (
        d.image_size,
        d.in_chans,
        d.mean,
        a.scale,
        a.hflip,
        a.randaugment,
        a.color_jitter,
        a.interpolation,
    )


def _recipe_transforms() -> dict[tuple, list[str]]:
    """Distinct training transforms of the shipped recipes -> the recipes that use each."""
    groups: dict[tuple, list[str]] = {}
    for path in RECIPES:
        groups.setdefault(_transform_key(path), []).append(str(path.relative_to(CONFIGS)))
    return groups


TRANSFORMS = _recipe_transforms()


def test_the_transform_groups_cover_every_shipped_recipe():
    covered = sorted(name for names in TRANSFORMS.values() for name in names)
    assert covered == sorted(str(path.relative_to(CONFIGS)) for path in RECIPES)
    assert any("imagenet/deit_tiny_cskd.yaml" in names for names in TRANSFORMS.values())


@pytest.mark.parametrize("key", sorted(TRANSFORMS, key=str), ids=lambda key: TRANSFORMS[key][0])
def test_each_recipe_transform_draws_5000_photo_samples_without_failing(key):
    """5,000 samples of real photos through the training transform of these recipes."""
    image_size, in_chans, mean, scale, hflip, randaugment, jitter, interpolation = key
    transform = TrainTransform(
        image_size=image_size,
        scale=scale,
        hflip=hflip,
        randaugment=randaugment,
        color_jitter=jitter,
        interpolation=interpolation,
        mean=mean,
    )
    images = photos("RGB" if in_chans == 3 else "L")
    seed_all(0)
    for sample in range(5000):
        image, crop, _ = transform(images[sample % len(images)])
        assert image.shape == (in_chans, image_size, image_size), sample
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and crop.numel() == 4
