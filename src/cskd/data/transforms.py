"""Training and evaluation transforms: PIL image -> (image tensor, crop box, flip)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ..errors import DataError
from .sample import TransformResult, crop_tensor


def _interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        allowed = ", ".join(mode.value for mode in InterpolationMode)
        raise DataError(f"unknown interpolation {name!r}: use one of {allowed}") from None


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 or fewer gives black.

    timm's RandAugment asks for 0 bits when a magnitude drawn with ``mstd`` is clipped to its
    maximum (``PosterizeIncreasing`` at magnitude 10, ``Posterize`` at 0). Pillow before 9.x
    returned a black image for 0 bits, which is what DeiT and the CSKD release trained with;
    Pillow 10 and later raise ``ValueError``. This keeps the old result for every bit count.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def rand_augment(config: str, hparams: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for ``config`` (e.g. ``rand-m9-mstd0.5-inc1``), with :func:`posterize`
    in place of timm's for the posterize ops, so that no magnitude it can draw raises.

    Only the op's function is replaced: the ops, their probabilities and the random draws
    (op choice, magnitude, sign) are timm's, so the distribution of augmented images is the
    reference pipeline's. Raises what timm raises for a malformed ``config``.
    """
    from timm.data import auto_augment

    transform = auto_augment.rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


class TrainTransform:
    """Training augmentation: RandomResizedCrop, horizontal flip, RandAugment, ToTensor.

    Calling it on a PIL image returns ``(image, crop, flip)``: a float tensor C x S x S in
    [0, 1], the crop box ``[top, left, height, width]`` in the input image's pixels, and a bool
    tensor telling whether the crop was mirrored. Cropping the input with that box (resizing to
    S x S with ``interpolation``) and mirroring reproduces the image before RandAugment.

    ``randaugment`` is a timm config string (``""`` turns it off). Single-channel ("L") images
    get RandAugment with a grey fill value (the mean of ``mean``). ``color_jitter`` follows
    timm: it is applied (brightness, contrast, saturation) only when RandAugment is off.
    """

    def __init__(
        self,
        *,
        image_size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        randaugment: str = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
    ) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if not 0.0 <= hflip <= 1.0:
            raise DataError(f"hflip must be a probability in [0, 1], got {hflip}")
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise DataError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise DataError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
        if color_jitter < 0:
            raise DataError(f"color_jitter must be >= 0, got {color_jitter}")
        self.image_size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.interpolation = _interpolation_mode(interpolation)
        self.randaugment_rgb: Callable[[Image.Image], Image.Image] | None = None
        self.randaugment_gray: Callable[[Image.Image], Image.Image] | None = None
        self.color_jitter: Callable[[Image.Image], Image.Image] | None = None
        if randaugment:
            if not randaugment.startswith("rand"):
                raise DataError(
                    f"augment.randaugment={randaugment!r} is not a RandAugment config: use e.g. "
                    "'rand-m9-mstd0.5-inc1', or '' to turn it off"
                )
            from timm.data.transforms import str_to_pil_interp

            fill = tuple(round(255 * m) for m in mean)
            base_hparams = dict(
                translate_const=int(image_size * 0.45),
                interpolation=str_to_pil_interp(interpolation),
            )
            try:
                self.randaugment_rgb = rand_augment(randaugment, dict(base_hparams, img_mean=fill))
                # PIL geometric ops on "L" images need a single fill value, not an RGB triple.
                self.randaugment_gray = rand_augment(
                    randaugment, dict(base_hparams, img_mean=round(sum(fill) / len(fill)))
                )
            except (AssertionError, ValueError, KeyError) as error:
                raise DataError(
                    f"invalid augment.randaugment={randaugment!r} ({error or 'bad section'}): "
                    "use e.g. 'rand-m9-mstd0.5-inc1'"
                ) from None
        elif color_jitter > 0:
            self.color_jitter = torchvision.transforms.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter
            )

    def __call__(self, image: Image.Image) -> TransformResult:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(image, top, left, height, width, size, self.interpolation)
        flip = bool(torch.rand(1).item() < self.hflip)
        if flip:
            image = TF.hflip(image)
        if self.randaugment_rgb is not None:
            augment = self.randaugment_gray if image.mode == "L" else self.randaugment_rgb
            image = augment(image)
        if self.color_jitter is not None:
            image = self.color_jitter(image)
        return TF.to_tensor(image), crop_tensor(top, left, height, width), torch.tensor(flip)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, "
            f"ratio={self.ratio}, hflip={self.hflip}, interpolation={self.interpolation.value}, "
            f"randaugment={self.randaugment_rgb is not None}, "
            f"color_jitter={self.color_jitter is not None})"
        )


class EvalTransform:
    """The standard evaluation protocol, as timm and DeiT apply it: resize the shorter side to
    ``floor(image_size / crop_pct)`` (256 for 224 px at 0.875), then take the central
    ``image_size`` square.

    The pixels come from timm's own ``transforms_imagenet_eval`` (so they equal timm's and
    DeiT's evaluation input exactly); :meth:`crop_box` gives the region of the original image
    they show. Returns ``(image, crop, flip)`` like :class:`TrainTransform`, flip always False;
    the box is fractional here (a resize then a whole-pixel crop of the resized image).
    """

    def __init__(
        self, *, image_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
    ) -> None:
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        if not 0.0 < crop_pct <= 1.0:
            raise DataError(f"data.eval_crop_pct must be in (0, 1], got {crop_pct}")
        from timm.data.transforms_factory import transforms_imagenet_eval

        self.image_size = image_size
        self.crop_pct = crop_pct
        self.interpolation = _interpolation_mode(interpolation)
        self.resize_to = math.floor(image_size / crop_pct)  # the shorter side before cropping
        # normalize=False: uint8 tensors, turned into [0, 1] floats exactly as ToTensor does
        self.pipeline = transforms_imagenet_eval(
            img_size=image_size,
            crop_pct=crop_pct,
            interpolation=interpolation,
            normalize=False,
        )

    def crop_box(self, *, height: int, width: int) -> tuple[float, float, float, float]:
        """``(top, left, height, width)`` in input pixels of the region the output shows.

        torchvision's ``Resize(s)`` scales the shorter side to ``s`` and the longer one to
        ``int(s * longer / shorter)``; ``CenterCrop(S)`` then starts at
        ``round((resized - S) / 2)`` on each axis.
        """
        short, long = min(height, width), max(height, width)
        resized_long = int(self.resize_to * long / short)
        resized_h, resized_w = (
            (self.resize_to, resized_long) if height <= width else (resized_long, self.resize_to)
        )
        scale_h, scale_w = height / resized_h, width / resized_w
        top = round((resized_h - self.image_size) / 2) * scale_h
        left = round((resized_w - self.image_size) / 2) * scale_w
        return top, left, self.image_size * scale_h, self.image_size * scale_w

    def __call__(self, image: Image.Image) -> TransformResult:
        box = self.crop_box(height=image.height, width=image.width)
        tensor = self.pipeline(image).float().div_(255)  # (C, S, S), as TF.to_tensor gives
        return tensor, torch.tensor(box, dtype=torch.float32), torch.tensor(False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, crop_pct={self.crop_pct}, "
            f"interpolation={self.interpolation.value})"
        )
