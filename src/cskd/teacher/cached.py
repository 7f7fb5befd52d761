"""Teacher targets rebuilt from a cache, for the exact view the student's batch received.

A cache (:mod:`cskd.teacher.store`) holds, per training image, the teacher's dense logits of the
whole image on a ``Hc x Wc`` grid. For a training sample cropped to the box ``(top, left,
height, width)`` of its ``(H_img, W_img)`` original and maybe mirrored, the target on the
teacher's training grid ``H x W`` is

    RoIAlign(map, box scaled to the map, output H x W)       -> (N, K, H, W), then mirrored

and Mixup/CutMix mix those maps as they mixed the pixels: each target cell takes its partner's
(the sample at ``N - 1 - i``, as timm pairs them) map in the proportion of partner pixels in the
cell. The global target is the mean of the cells, as it is for a teacher whose head is global
average pooling then a linear layer (P_global = mean of P_local, method.md).

What this follows exactly and what it approximates (measured in docs/results/cache.md):
the crop box, the flip and the Mixup/CutMix proportions are followed exactly; the teacher's
response to the crop is approximated by its response to the whole image (a network is not
translation- or scale-equivariant, and the cache sees the crop at another resolution);
RandAugment (colour and geometry), random erasing and the non-linearity of Mixup (the teacher
of a blended image is not the blend of the teacher's maps) are not seen by the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from ..config import Config
from ..errors import CacheError, ConfigError
from ..method.adapters import DenseTeacher, TeacherOutput
from .store import TeacherCache, data_digest, open_cache, tensors_digest

log = logging.getLogger("cskd")


def mix_with_partner_weights(
    mixup, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply timm's ``mixup`` (any mode, Mixup or CutMix) and also return, per pixel, the weight
    of the partner image in the result: ``(images, targets, partner (N, S, S) in [0, 1])``.

    The weights come from timm's own mixing, not from re-deriving its random box: a channel
    holding each sample's position ``i`` is mixed with the images, and a pixel that reads ``v``
    holds the fraction ``(v - i) / (N - 1 - 2 i)`` of sample ``N - 1 - i``.
    """
    count = images.shape[0]
    position = torch.arange(count, device=images.device, dtype=torch.float32)
    code = position.view(count, 1, 1, 1).expand(count, 1, *images.shape[-2:])
    mixed, targets = mixup(torch.cat([images, code.to(images.dtype)], dim=1), targets)
    images, code = mixed[:, :-1], mixed[:, -1].float()  # (N, C, S, S), (N, S, S)
    span = (count - 1 - 2 * position).view(count, 1, 1)  # never 0: timm needs an even batch
    partner = ((code - position.view(count, 1, 1)) / span).clamp_(0.0, 1.0)
    return images, targets, partner


class CachedTeacher(nn.Module):
    """Stands in for :class:`~cskd.method.adapters.DenseTeacher` in training: no teacher forward.

    ``grid``: the teacher's map size at the training image size, ``(H, W)`` (the cache's
    ``train_grid``). Call with the batch's ``index`` (N,), ``crop`` (N, 4) boxes ``[top, left,
    height, width]`` in original pixels, ``flip`` (N,) bool, and ``partner`` (N, S, S) Mixup
    weights or None; returns a :class:`TeacherOutput` with dense logits (N, K, H, W) and global
    logits (N, K), float32, on ``device``.
    """

    def __init__(self, cache: TeacherCache, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cache = cache
        self.grid = tuple(cache.header["train_grid"])
        self.device = torch.device(device)

    def train(self, mode: bool = True) -> CachedTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(
        self,
        *,
        index: torch.Tensor,
        crop: torch.Tensor,
        flip: torch.Tensor,
        partner: torch.Tensor | None = None,
    ) -> TeacherOutput:
        maps, sizes = self.cache.maps(index)  # (N, K, Hc, Wc), (N, 2) original (height, width)
        maps, sizes = maps.to(self.device), sizes.to(self.device)
        crop = crop.to(self.device, torch.float32)
        map_h, map_w = maps.shape[-2:]
        top, left, height, width = crop.unbind(1)
        scale_y, scale_x = map_h / sizes[:, 0], map_w / sizes[:, 1]
        boxes = torch.stack(  # (N, 5): batch index, x1, y1, x2, y2 in map cells
            [
                torch.arange(len(maps), device=self.device, dtype=torch.float32),
                left * scale_x,
                top * scale_y,
                (left + width) * scale_x,
                (top + height) * scale_y,
            ],
            dim=1,
        )
        dense = roi_align(maps, boxes, output_size=self.grid, sampling_ratio=-1, aligned=True)
        mirrored = flip.to(self.device).bool()
        dense = torch.where(mirrored.view(-1, 1, 1, 1), dense.flip(-1), dense)  # (N, K, H, W)
        if partner is not None:
            weight = F.adaptive_avg_pool2d(partner[:, None].float(), self.grid)  # (N, 1, H, W)
            dense = (1 - weight) * dense + weight * dense.flip(0)
        return TeacherOutput(dense_logits=dense, global_logits=dense.mean(dim=(2, 3)))


def run_expectations(config: Config, *, teacher: DenseTeacher, train_set) -> dict:
    """What a cache must have been made from to serve this run (:data:`MUST_MATCH` keys)."""
    return {
        "teacher_name": config.teacher.name,
        "teacher_weights_sha256": tensors_digest(teacher.model.state_dict()),
        "data_digest": data_digest(train_set),
        "image_size": config.data.image_size,
        "num_classes": config.data.num_classes,
        "teacher_mean": list(config.teacher.mean),
        "teacher_std": list(config.teacher.std),
    }


def open_cached_teacher(
    config: Config, *, teacher: DenseTeacher, train_set, device: torch.device
) -> CachedTeacher:
    """The cache at ``teacher.cache``, verified against this run, as the step's teacher."""
    if config.distill.method == "none":
        raise ConfigError(
            "teacher.cache is set but distill.method=none uses no teacher: unset teacher.cache"
        )
    path = Path(config.teacher.cache)
    expected = run_expectations(config, teacher=teacher, train_set=train_set)
    cache = open_cache(path, expected=expected)
    soft = [
        key
        for key, kind in (
            ("distill.cskd_kind", config.distill.cskd_kind),
            ("distill.token_kind", config.distill.token_kind),
        )
        if kind == "soft" and (key == "distill.token_kind" or config.distill.method == "cskd")
    ]
    if cache.header["topk"] and soft:
        raise ConfigError(
            f"teacher cache {path} keeps only the top-{cache.header['topk']} logits per cell, "
            f"which give hard targets but not the soft ones {soft[0]}=soft needs: build a cache "
            "of every logit (teacher.cache_topk=0), or use hard targets"
        )
    grid = list(teacher.grid(config.data.image_size))
    if list(cache.header["train_grid"]) != grid:
        raise CacheError(
            f"teacher cache {path} targets a {cache.header['train_grid']} grid but the teacher "
            f"gives {grid} at {config.data.image_size} px: rebuild it with `cskd cache`"
        )
    header = cache.header
    log.info(
        f"teacher targets from the cache {path} ({header['images']} images, map "
        f"{header['map_grid']} at {header['cache_size']} px, "
        f"{'top-' + str(header['topk']) if header['topk'] else 'all'} logits in "
        f"{header['dtype']}): the teacher does not run in the training step"
    )
    return CachedTeacher(cache, device=device)
