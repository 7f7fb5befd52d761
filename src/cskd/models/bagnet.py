"""``bagnet19``, ``bagnet27``: CNN teachers whose dense map is local, for the test CSKD's
argument needs.

CSKD's dense target is only new information when the teacher's cells answer for what they see.
A ResNet-18 at output stride 8 sees the whole 64 px canvas from every cell, so its background
cells answer for the garment (docs/results/regime_translated.md). A BagNet (Brendel and Bethge,
"Approximating CNNs with Bag-of-local-Features models", ICLR 2019) bounds what a cell sees by
using 3 x 3 convolutions in only a few blocks and 1 x 1 convolutions everywhere else.

Built from timm's Bring-Your-Own-Blocks network (:class:`timm.models.byobnet.ByobNet`): a 3 x 3
stem convolution at stride 2, then four stages of two bottleneck blocks (timm's ``bottle``:
1x1 - kxk - 1x1, with a residual shortcut). Only the first block of stages 1 to 3 has k = 3;
every other convolution is 1 x 1 (the strided shortcuts too), so only four convolutions grow
the receptive field, each by (k - 1) x (the stride before it):

    layer                      stride after (px)   receptive field (px)
    stem, 3x3 /2               2                   1 + 2 x 1 = 3
    stage 1 block 1, 3x3 /1    2                   3 + 2 x 2 = 7
    stage 2 block 1, 3x3 /2    4                   7 + 2 x 2 = 11
    stage 3 block 1, 3x3 /2    8                   11 + 2 x 4 = 19
    stage 4, 1x1 only          8                   19

Output stride 8: a 64 px image gives an 8 x 8 map of 8 px cells, each computed from a 19 x 19 px
window (30% of the canvas side; tests/models/test_bagnet.py measures it from the gradient of one
cell). ``bagnet27`` differs in one place: the middle convolution of stage 3's first block is
5 x 5, which adds 4 x 4 = 16 px instead of 8: 27 x 27 px windows, about the side of a 28 px
garment. The head is timm's: global average pooling and a linear layer, so the mean of the dense
logits is the model's output (what :class:`cskd.method.adapters.DenseTeacher` checks).
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.models import build_model_with_cfg, register_model
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

__all__ = ["bagnet19", "bagnet27", "bagnet_config"]

# per model: the middle convolution of each stage's first block, and the receptive field (px)
# that follows from the table above (measured in tests/models/test_bagnet.py)
KERNEL_SIZES = {"bagnet19": (3, 3, 3, 1), "bagnet27": (3, 3, 5, 1)}
RECEPTIVE_FIELD = {"bagnet19": 19, "bagnet27": 27}

_default_cfg = {
    "url": "",
    "num_classes": 1000,
    "input_size": (3, 64, 64),
    "pool_size": (8, 8),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "first_conv": "stem.conv",
    "classifier": "head.fc",
}
# read by timm's register_model: each model's pretrained_cfg (no weights)
default_cfgs = {name: dict(_default_cfg) for name in KERNEL_SIZES}


def bagnet_config(
    channels: Sequence[int] = (64, 128, 256, 512),
    *,
    kernel_sizes: Sequence[int] = (3, 3, 3, 1),
    strides: Sequence[int] = (1, 2, 2, 1),
) -> ByoModelCfg:
    """The ByobNet configuration: one stage per entry of ``channels`` (output channels of its
    blocks), each of two bottleneck blocks (bottleneck ratio 1: the middle convolution is as
    wide as the block's output); the first block of stage i has a ``kernel_sizes[i]`` middle
    convolution and stride ``strides[i]``, the second a 1 x 1 one. The stem (3 x 3, stride 2)
    has ``channels[0]`` channels. No maxpool and no final 1x1 convolution before the head."""
    if not len(channels) == len(kernel_sizes) == len(strides):
        raise ValueError(
            f"bagnet: channels {list(channels)}, kernel_sizes {list(kernel_sizes)} and strides "
            f"{list(strides)} must have one entry per stage"
        )
    stages = tuple(
        (
            ByoBlockCfg(
                type="bottle", d=1, c=width, s=stride, br=1.0, block_kwargs={"kernel_size": k}
            ),
            ByoBlockCfg(type="bottle", d=1, c=width, s=1, br=1.0, block_kwargs={"kernel_size": 1}),
        )
        for width, k, stride in zip(channels, kernel_sizes, strides, strict=True)
    )
    return ByoModelCfg(
        blocks=stages,
        stem_type="3x3",
        stem_pool="",
        stem_chs=channels[0],
        downsample="conv1x1",
        num_features=0,
    )


def _bagnet(name: str, pretrained: bool, channels: Sequence[int], **kwargs) -> ByobNet:
    return build_model_with_cfg(
        ByobNet,
        name,
        pretrained,
        model_cfg=bagnet_config(tuple(channels), kernel_sizes=KERNEL_SIZES[name]),
        feature_cfg={"flatten_sequential": True},
        **kwargs,
    )


@register_model
def bagnet19(pretrained: bool = False, channels: Sequence[int] = (64, 128, 256, 512), **kwargs):
    """BagNet with a 19 x 19 px receptive field per map cell at output stride 8 (see the module
    docstring). ``channels``: the four stages' widths (the Fashion-MNIST studies use
    ``[16, 32, 64, 128]``, as their ResNet-18); the other keyword arguments are
    :class:`~timm.models.byobnet.ByobNet`'s (``in_chans``, ``num_classes``, ``output_stride``:
    8 and above keep the native stride 8, ``drop_path_rate``, ``zero_init_last``...)."""
    return _bagnet("bagnet19", pretrained, channels, **kwargs)


@register_model
def bagnet27(pretrained: bool = False, channels: Sequence[int] = (64, 128, 256, 512), **kwargs):
    """:func:`bagnet19` with a 5 x 5 middle convolution in stage 3's first block: each map cell
    computed from a 27 x 27 px window (the module docstring). Arguments as :func:`bagnet19`."""
    return _bagnet("bagnet27", pretrained, channels, **kwargs)
