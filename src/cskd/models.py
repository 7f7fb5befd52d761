"""Adapters that give timm models the dense outputs CSKD needs, without editing timm.

``DenseTeacher`` wraps a timm CNN whose head is global average pooling then a linear layer and
applies that layer at every location of the final feature map: the dense logits P_local. The
ordinary output is P_global, and P_global is the spatial mean of P_local.

``DenseStudent`` wraps a timm ViT and applies its distillation head (the class head for a model
without a distillation token) to every patch token after the final norm: Z_patch. It adds no
parameters, and returns the same named structure in train and eval mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.nn import functional as F

from .align import align_to_grid
from .checkpoint import CheckpointError
from .weights import (
    classifier_weights,
    init_from,
    load_adapted,
    read_export_metadata,
    read_state_dict,
    resolve_source,
)

log = logging.getLogger("cskd")

INFERENCE_RULES = ("cls", "cls+dist", "cls+dist+patch")


class TeacherError(ValueError):
    """The teacher cannot give the dense responses CSKD needs."""


@dataclass
class TeacherOutput:
    dense_logits: torch.Tensor  # (N, K, H, W): the classifier at every feature-map location
    global_logits: torch.Tensor  # (N, K): the model's ordinary output


@dataclass
class StudentOutput:
    cls_logits: torch.Tensor  # (N, K): class-token head
    dist_logits: torch.Tensor | None  # (N, K): distillation-token head, None without the token
    patch_logits: torch.Tensor | None  # (N, M, K): patch head per token, row-major on patch_grid
    patch_grid: tuple[int, int]  # the grid patch_logits lies on: (h, w), or the output_grid asked


def _first_conv_channels(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


class DenseTeacher(nn.Module):
    """A frozen timm CNN that returns :class:`TeacherOutput`.

    At construction a random batch of ``check_size`` pixels (the data's image size) checks
    that the model's final features are an (N, C, H, W) map and that the mean of the dense
    logits equals the model's output; models for which it cannot hold are refused.

    ``dense=False`` (DeiT distillation, which needs only the global logits) accepts any timm
    classifier, a ViT included; ``dense_logits`` is then None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str | None = None,
        check_size: int = 64,
        amp_dtype: torch.dtype | None = None,
        fp32_head: bool = False,
        dense: bool = True,
    ) -> None:
        super().__init__()
        self.name = name or type(model).__name__
        self.dense = dense
        # None: the caller's precision; float32: autocast off; float16/bfloat16: autocast to it
        self.amp_dtype = amp_dtype
        self.fp32_head = fp32_head  # classifier (dense and global) in fp32 from the features
        self.channels_last = False  # inputs made channels-last (set with the model's format)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if dense and not isinstance(classifier, nn.Linear):
            raise TeacherError(
                f"teacher {self.name}: its classifier is {type(classifier).__name__}, not a linear "
                "layer, so it cannot be applied at every location; use a CNN whose head is global "
                "average pooling then a linear layer (ResNet, RegNet, EfficientNet)"
            )
        self.model = model
        self.classifier = classifier
        self.model.requires_grad_(False)
        self.model.eval()
        self._check_dense_head(check_size)

    @property
    def num_classes(self) -> int:
        if isinstance(self.classifier, nn.Linear):
            return self.classifier.out_features
        return self.model.num_classes

    def train(self, mode: bool = True) -> DenseTeacher:
        """The teacher stays in eval mode whatever its parent asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images: (N, C, S, S) in the teacher's normalisation -> dense (N, K, H, W) and global
        (N, K) logits. With ``amp_dtype`` set the pass runs at that precision whatever the
        caller's autocast (float16 is how the CSKD release runs its teacher; float32 turns
        autocast off); with ``fp32_head`` only the features are computed at low precision."""
        device_type = images.device.type
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.amp_dtype is None:
            precision = contextlib.nullcontext()
        elif self.amp_dtype == torch.float32:
            precision = torch.autocast(device_type, enabled=False)
        else:
            precision = torch.autocast(device_type, dtype=self.amp_dtype)
        with precision:
            if not self.dense:
                return TeacherOutput(dense_logits=None, global_logits=self.model(images))
            features = self.model.forward_features(images)  # (N, C_f, H, W)
            if not self.fp32_head:
                return self._heads(features)
        with torch.autocast(device_type, enabled=False):
            return self._heads(features.float())

    def _heads(self, features: torch.Tensor) -> TeacherOutput:
        global_logits = self.model.forward_head(features)  # (N, K)
        weight = self.classifier.weight[:, :, None, None]  # (K, C_f, 1, 1)
        dense_logits = F.conv2d(features, weight, self.classifier.bias)  # (N, K, H, W)
        return TeacherOutput(dense_logits=dense_logits, global_logits=global_logits)

    def _check_dense_head(self, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters())
        images = torch.randn(2, _first_conv_channels(self.model), size, size, generator=generator)
        images = images.to(device=parameter.device, dtype=parameter.dtype)
        if not self.dense:
            return
        with torch.no_grad():
            features = self.model.forward_features(images)
        if features.ndim != 4:
            raise TeacherError(
                f"teacher {self.name}: its final features are {tuple(features.shape)}, not an "
                "(N, C, H, W) map (a ViT gives tokens), so it has no dense logits: CSKD needs a "
                "CNN teacher (ResNet, RegNet, EfficientNet); with this teacher use "
                "distill.method=deit"
            )
        output = self(images)
        mean = output.dense_logits.float().mean(dim=(2, 3))
        reference = output.global_logits.float()
        error = (mean - reference).abs().max().item()
        if error > 1e-3 * (1.0 + reference.abs().max().item()):
            raise TeacherError(
                f"teacher {self.name}: the mean of its dense logits differs from its output by "
                f"{error:.3g}, so its head is not global average pooling then a linear layer "
                "(normalisation or an MLP after pooling, as in ConvNeXt, cannot give dense logits); "
                "choose a teacher such as a ResNet, RegNet or EfficientNet"
            )


def load_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    num_classes: int,
    pretrained_tag: str | None = None,
    dense: bool = True,
    image_size: int = 64,
    **model_kwargs,
) -> DenseTeacher:
    """Build the timm model ``name`` with its weights and wrap it as a :class:`DenseTeacher`.

    ``checkpoint``: a weights file in any form :func:`cskd.weights.extract_state_dict` reads
    (``.safetensors``, a state dict, DeiT's ``{"model": ...}``, timm's ``{"state_dict": ...}``,
    a cskd ``best.pt``) or a cskd run directory, read without unpickling code; another number of
    input channels is adapted, but its head must have the data's ``num_classes`` (else
    :class:`~cskd.checkpoint.CheckpointError` pointing at the teacher-refit recipe). Without a
    checkpoint, ``pretrained_tag`` (e.g. ``deit_in1k``) asks timm's hub for weights.
    ``dense`` and ``image_size``: see :class:`DenseTeacher` (``dense=False`` for DeiT
    distillation, which needs only global logits; ``image_size`` is the data's).
    """
    if checkpoint:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
        try:
            lines = init_from(model, checkpoint, what=f"teacher {name}", adapt_head=False)
            for line in lines[1:]:  # the adaptations (the file is named in the config)
                log.info(line)
        except CheckpointError as error:
            if "-class head" not in str(error):
                raise
            raise CheckpointError(
                f"{error}; a teacher must know the data's classes: refit it on your data first "
                "(configs/finetune/teacher_resnet50.yaml or teacher_regnety_160.yaml; at CPU scale "
                "fashion_mnist_teacher_refit.yaml; README 'Your own data')"
            ) from None
    elif pretrained_tag:
        model = create_pretrained(
            name,
            pretrained_tag,
            what="teacher",
            num_classes=num_classes,
            adapt_head=False,
            **model_kwargs,
        )
    else:
        raise TeacherError(
            f"teacher {name} has no weights: set teacher.checkpoint to a local file or "
            "teacher.pretrained_tag to a timm tag (e.g. deit_in1k)"
        )
    return DenseTeacher(model, name=name, dense=dense, check_size=image_size)


def create_pretrained(
    name: str,
    tag: str,
    *,
    what: str,
    num_classes: int,
    reset_head: bool = False,
    adapt_head: bool = True,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(f"{name}.{tag}", pretrained=True, ...)``: timm fetches the weights from
    its hub and adapts a head of another class count, input channels and position embeddings
    itself; each adaptation is logged. ``reset_head`` re-initialises heads whose size fits;
    ``adapt_head=False`` (a teacher) refuses weights for other classes. Raises
    :class:`~cskd.checkpoint.CheckpointError` for that, an unknown tag or a failed fetch (no
    network)."""
    full = f"{name}.{tag}"
    try:
        saved = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"{what}.pretrained_tag: {error} (timm.list_pretrained('{name}*') lists the tags)"
        ) from None
    saved_classes = saved.num_classes if saved is not None else num_classes
    if saved_classes != num_classes and not adapt_head:
        raise CheckpointError(
            f"timm's {full} weights have a {saved_classes}-class head but the data has "
            f"{num_classes} classes; a teacher must know the data's classes: refit it on your "
            "data first (configs/finetune/teacher_resnet50.yaml or teacher_regnety_160.yaml; "
            "README 'Your own data')"
        )
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as error:  # noqa: BLE001 - hub, network and file errors: one line each
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"could not get timm's {full} weights for the {what} ({reason[:200]}): without a "
            f"network download them elsewhere and set {what}.checkpoint to the file"
        ) from None
    log.info(f"{what} {name}: initialised from timm's {full}")
    heads = ", ".join(key.rsplit(".", 1)[0] for key, _ in classifier_weights(model))
    if saved_classes != num_classes:
        log.info(
            f"{what} {name}: re-initialised {heads} (timm's weights have {saved_classes} "
            f"classes, the model {num_classes})"
        )
    elif reset_head:
        model.reset_classifier(num_classes)
        log.info(f"{what} {name}: re-initialised {heads} (reset_head: a new label set)")
    size = kwargs.get("img_size")
    if size is not None and saved is not None and saved.input_size[-1] != size:
        log.info(
            f"{what} {name}: timm resampled the position embeddings from "
            f"{saved.input_size[-1]} px to {size} px"
        )
    return model


class DenseStudent(nn.Module):
    """A timm ViT that returns :class:`StudentOutput` in train and eval mode alike.

    Its ``state_dict`` is the wrapped timm model's, so it loads into ``timm.create_model(name)``.
    ``inference_rule`` names how :meth:`predict` combines the heads (see :func:`combine_heads`).
    """

    def __init__(self, model: nn.Module, *, inference_rule: str = "cls+dist+patch") -> None:
        super().__init__()
        if inference_rule not in INFERENCE_RULES:
            raise ValueError(
                f"unknown inference rule {inference_rule!r}: choose one of {INFERENCE_RULES}"
            )
        self.inference_rule = inference_rule
        if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
            raise TypeError(
                f"{type(model).__name__} is not a timm Vision Transformer "
                "(it has no patch_embed / num_prefix_tokens)"
            )
        self.model = model
        self.distilled = getattr(model, "dist_token", None) is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w): the patch grid for the model's configured image size."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def patch_head(self) -> nn.Module:
        """The head applied to patch tokens: the distillation head, or the class head."""
        return self.model.head_dist if self.distilled else self.model.head

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def _grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        if getattr(self.model, "dynamic_img_size", False):
            return tuple(self.model.patch_embed.dynamic_feat_size(images.shape[-2:]))
        return self.grid_size

    def forward(
        self,
        images: torch.Tensor,
        *,
        output_grid: tuple[int, int] | None = None,
        with_patches: bool = True,
    ) -> StudentOutput:
        """Run the ViT once and apply its heads.

        With ``output_grid`` (the teacher's H x W) the patch tokens are pooled to that grid before
        the head (exact, since pooling and the head are both linear), and ``patch_logits`` is
        (N, H*W, K); ``(1, 1)`` gives the mean patch logits the ``cls+dist+patch`` rule needs.
        ``with_patches=False`` skips the patch head (``patch_logits`` is None).
        """
        model = self.model
        tokens = model.forward_features(images)  # (N, P + M, D), after the final norm
        if self.distilled:
            cls_logits = model.head(model.head_drop(tokens[:, 0]))  # (N, K)
            dist_logits = model.head_dist(model.head_drop(tokens[:, 1]))  # (N, K)
        else:
            cls_logits = model.forward_head(tokens)  # (N, K)
            dist_logits = None
        if not with_patches:
            return StudentOutput(cls_logits, dist_logits, None, self._grid_for(images))
        patches = tokens[:, model.num_prefix_tokens :]  # (N, M, D), M = h * w row-major
        patches = model.fc_norm(patches) if hasattr(model, "fc_norm") else patches
        grid = self._grid_for(images)
        if output_grid is not None:
            patches = align_to_grid(patches, grid, output_grid)  # (N, H*W, D)
            grid = tuple(output_grid)
        patch_logits = self.patch_head(model.head_drop(patches))  # (N, M or H*W, K)
        return StudentOutput(cls_logits, dist_logits, patch_logits, grid)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Inference logits (N, K) under ``inference_rule``; the patch head sees the mean token."""
        return combine_heads(self(images, output_grid=(1, 1)), self.inference_rule)


def combine_heads(output: StudentOutput, rule: str = "cls+dist+patch") -> torch.Tensor:
    """Inference logits (N, K) under a named rule.

    ``cls``: class head. ``cls+dist``: mean of class and distillation heads (DeiT).
    ``cls+dist+patch``: mean of class head, distillation head and the patch head averaged over
    locations (the released CSKD code). Heads a model lacks (no distillation token, or no patch
    logits for a CNN) are left out of the mean.
    """
    if rule not in INFERENCE_RULES:
        raise ValueError(f"unknown inference rule {rule!r}: choose one of {INFERENCE_RULES}")
    heads = [output.cls_logits]
    if rule != "cls" and output.dist_logits is not None:
        heads.append(output.dist_logits)
    if rule == "cls+dist+patch" and output.patch_logits is not None:
        heads.append(output.patch_logits.mean(dim=1))
    return torch.stack(heads).mean(dim=0)


class PlainClassifier(nn.Module):
    """Any timm classifier (e.g. a CNN trained as a teacher with method ``none``) behind the
    :class:`StudentOutput` contract: only ``cls_logits`` is set."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.distilled = False

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, images: torch.Tensor, **_: object) -> StudentOutput:
        return StudentOutput(self.model(images), None, None, (1, 1))


def wrap_student(
    model: nn.Module, *, inference_rule: str = "cls+dist+patch"
) -> DenseStudent | PlainClassifier:
    """A ViT becomes a :class:`DenseStudent`; any other classifier a :class:`PlainClassifier`."""
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        return DenseStudent(model, inference_rule=inference_rule)
    return PlainClassifier(model)


def rules_for(student: nn.Module) -> tuple[str, ...]:
    """The inference rules that differ for this student (all three for a ViT, ``cls`` for a CNN)."""
    return INFERENCE_RULES if isinstance(student, DenseStudent) else ("cls",)


def load_student(
    path: str | os.PathLike, *, image_size: int | None = None
) -> DenseStudent | PlainClassifier:
    """Rebuild an exported student from its file alone: ``student.safetensors`` (or the run
    directory holding it) carries the timm name, keyword arguments, classes, input size,
    normalisation and inference rule (:func:`cskd.weights.export_metadata`), kept on the
    result as ``.export``. ``image_size`` builds a ViT for another input size, its position
    embeddings resampled as timm does. ``student(images)`` then takes (N, C, S, S) images
    normalised with ``.export["mean"]``/``["std"]``; ``.predict`` gives (N, K) logits under
    the saved rule. Raises :class:`~cskd.checkpoint.CheckpointError` for a file without cskd
    metadata."""
    source = resolve_source(path)
    info = read_export_metadata(source) if source.suffix == ".safetensors" else None
    if info is None:
        raise CheckpointError(
            f"{source} carries no cskd export metadata (only student.safetensors written by "
            "cskd train does): build the model with timm.create_model and load the weights"
        )
    state, _ = read_state_dict(source)
    kwargs = dict(info["model_kwargs"])
    if image_size and "pos_embed" in state:
        kwargs["img_size"] = image_size
    model = timm.create_model(info["timm_name"], pretrained=False, **kwargs)
    for line in load_adapted(model, state, path=source, what="student", adapt_head=False):
        log.info(line)
    if image_size:
        info = {**info, "input_size": [info["input_size"][0], image_size, image_size]}
    student = wrap_student(model, inference_rule=info["inference_rule"])
    student.export = info
    return student
