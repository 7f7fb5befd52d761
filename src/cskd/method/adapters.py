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
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TeacherError
from .align import align_to_grid

log = logging.getLogger("cskd")

INFERENCE_RULES = ("cls", "cls+dist", "cls+dist+patch")


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


def _model_channels(model: nn.Module) -> int:
    """The input channels a timm model was built for: its ``in_chans`` where it keeps it, else
    its first convolution's (a guess that a space-to-depth stem defeats)."""
    return getattr(model, "in_chans", None) or _first_conv_channels(model)


def _feature_format(model: nn.Module) -> str:
    """``"NHWC"`` when the model's final features are channels-last (Swin, MambaOut: timm's
    ``output_fmt`` or its head's ``input_fmt``), else ``"NCHW"``."""
    formats = (
        getattr(model, "output_fmt", None),
        getattr(getattr(model, "head", None), "input_fmt", None),
    )
    return "NHWC" if "NHWC" in [str(getattr(f, "value", f)) for f in formats] else "NCHW"


def _head_name(model: nn.Module) -> str:
    """What sits between the final features and the logits, for messages: the modules that
    ``forward_head`` runs (timm names them ``head``, ``conv_head``, ``fc``...)."""
    names = [
        n for n in ("head", "conv_head", "pre_logits", "head_hidden", "fc") if hasattr(model, n)
    ]
    parts = [f"{n} ({type(getattr(model, n)).__name__})" for n in names]
    return ", ".join(parts) or type(model.get_classifier()).__name__


class DenseTeacher(nn.Module):
    """A frozen timm CNN that returns :class:`TeacherOutput`, and owns its input normalisation.

    Dense logits are the model's own head applied at every location of its final map: each
    cell's feature vector goes through ``forward_head`` as a 1 x 1 map, so linear and 1x1-conv
    heads, NCHW and channels-last maps (timm's ``output_fmt``) all work; a plain linear head on
    an NCHW map takes the equivalent 1x1 convolution. At construction a random batch of
    ``check_size`` pixels (the data's image size) checks that the mean of the dense logits
    equals the model's output, which holds exactly when the head is affine after global average
    pooling (CSKD's premise, Sec. 3); any other head (an MLP, a norm or an activation after the
    pooling) is refused with :class:`~cskd.errors.TeacherError` naming it.

    ``global_only=True`` (DeiT distillation, which needs only the global logits) accepts any timm
    classifier, a ViT included; ``dense_logits`` is then None.

    ``mean`` / ``std`` (one value per input channel) are the normalisation the teacher was
    trained with, by default its timm ``pretrained_cfg``'s (as timm's ``DistillationTeacher``);
    :meth:`normalize` and :meth:`renormalize` are the only places the teacher's input is
    normalised, so training, the pre-flight, the diagnostics and the cache feed it alike.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str | None = None,
        check_size: int = 64,
        amp_dtype: torch.dtype | None = None,
        global_only: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name or type(model).__name__
        self.global_only = global_only
        # None: the caller's precision; float32: autocast off; float16/bfloat16: autocast to it
        self.amp_dtype = amp_dtype
        self.channels_last = False  # inputs made channels-last (set with the model's format)
        # the channels the model was built for (timm's in_chans); the first convolution's input
        # is a guess that fails for a space-to-depth stem (TResNet)
        self.in_chans = in_chans or _first_conv_channels(model)
        if mean is None or std is None:  # timm's configuration, where it fits the channels
            config = getattr(model, "pretrained_cfg", None) or {}
            mean, std = tuple(config.get("mean", ())), tuple(config.get("std", ()))
            if (len(mean), len(std)) != (self.in_chans, self.in_chans):
                mean = std = ()
        elif (len(mean), len(std)) != (self.in_chans, self.in_chans):
            raise TeacherError(
                f"teacher {self.name} takes {self.in_chans} input channel(s) but its "
                f"normalisation has {len(mean)} mean and {len(std)} std values: set teacher.mean "
                f"and teacher.std to {self.in_chans} value(s) each"
            )
        shape = (1, len(mean), 1, 1)
        self.register_buffer("input_mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(shape), persistent=False)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        self.model = model
        self.classifier = classifier
        self.feature_format = _feature_format(model)
        # a linear classifier right after the pooling of an NCHW map: the same as a 1x1 conv
        self._linear_map = isinstance(classifier, nn.Linear) and self.feature_format == "NCHW"
        self.model.requires_grad_(False)
        self.model.eval()
        self._check_dense_head(check_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) pixels in [0, 1] -> the teacher's input: (pixels - mean) / std."""
        self._check_normalisation()
        return (pixels - self.input_mean) / self.input_std

    def _check_normalisation(self) -> None:
        if self.input_mean.numel() == 0:
            raise TeacherError(
                f"teacher {self.name} has no input normalisation for its {self.in_chans} "
                "channel(s) (its timm configuration has none that fits): pass mean and std"
            )

    def renormalize(
        self, images: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """(N, C, S, S) images normalised with another ``mean`` / ``std`` (the student's, each
        (1, C, 1, 1)) -> the same pixels in the teacher's normalisation:
        x * std / std_t + (mean - mean_t) / std_t. Applied after erasing and Mixup, so the
        teacher sees exactly the batch the student sees."""
        self._check_normalisation()
        scale = std / self.input_std
        shift = (mean - self.input_mean) / self.input_std
        return images * scale + shift

    @torch.no_grad()
    def grid(self, image_size: int) -> tuple[int, int]:
        """The teacher's map (H, W) for ``image_size`` x ``image_size`` inputs (one blank pass per
        size, remembered)."""
        grids = self.__dict__.setdefault("_grids", {})
        if image_size not in grids:
            parameter = next(self.model.parameters())
            # two images: a norm over the batch fails on one image whose map is 1 x 1
            blank = torch.zeros(2, self.in_chans, image_size, image_size, device=parameter.device)
            grids[image_size] = tuple(self(blank).dense_logits.shape[-2:])
        return grids[image_size]

    def train(self, mode: bool = True) -> DenseTeacher:
        """The teacher stays in eval mode whatever its parent asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images: (N, C, S, S) in the teacher's normalisation -> dense (N, K, H, W) and global
        (N, K) logits. With ``amp_dtype`` set the pass runs at that precision whatever the
        caller's autocast (float16 is how the CSKD release runs its teacher; float32 turns
        autocast off)."""
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
            if self.global_only:
                return TeacherOutput(dense_logits=None, global_logits=self.model(images))
            return self.heads(self.model.forward_features(images))  # features (N, C_f, H, W)

    def heads(self, features: torch.Tensor) -> TeacherOutput:
        """The final feature map (N, C_f, H, W), or (N, H, W, C_f) channels-last -> global
        (N, K) and dense (N, K, H, W) logits."""
        global_logits = self.model.forward_head(features)  # (N, K)
        if self._linear_map:
            weight = self.classifier.weight[:, :, None, None]  # (K, C_f, 1, 1)
            dense_logits = F.conv2d(features, weight, self.classifier.bias)  # (N, K, H, W)
            return TeacherOutput(dense_logits=dense_logits, global_logits=global_logits)
        if self.feature_format == "NHWC":
            count, height, width, channels = features.shape
            cells = features.reshape(count * height * width, 1, 1, channels)
        else:
            count, channels, height, width = features.shape
            cells = features.permute(0, 2, 3, 1).reshape(count * height * width, channels, 1, 1)
        per_cell = self.model.forward_head(cells)  # (N*H*W, K): the head at each location
        dense_logits = per_cell.view(count, height, width, -1).permute(0, 3, 1, 2)
        return TeacherOutput(dense_logits=dense_logits, global_logits=global_logits)

    def _check_dense_head(self, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters())
        images = torch.randn(2, self.in_chans, size, size, generator=generator)
        images = images.to(device=parameter.device, dtype=parameter.dtype)
        if self.global_only:
            return
        try:
            with torch.no_grad():
                features = self.model.forward_features(images)
        except Exception as error:  # noqa: BLE001 - any model that cannot run here, one line
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise TeacherError(
                f"teacher {self.name}: its forward_features fails on {self.in_chans}-channel "
                f"{size} px images ({type(error).__name__}: {reason}): check teacher.kwargs "
                "and data.image_size, or use distill.method=deit"
            ) from None
        way_out = (
            "use distill.method=deit with this teacher, or a teacher whose head is global average "
            "pooling then a linear or 1x1-conv layer (a CNN teacher: ResNet, RegNet, EfficientNet, "
            "ResNetV2, DLA; or Swin)"
        )
        if not isinstance(features, torch.Tensor):
            raise TeacherError(
                f"teacher {self.name}: its final features are a {type(features).__name__} (several "
                f"streams), not an (N, C, H, W) map, so it has no dense logits: {way_out}"
            )
        if features.ndim != 4:
            raise TeacherError(
                f"teacher {self.name}: its final features are {tuple(features.shape)}, not an "
                f"(N, C, H, W) map (a ViT gives tokens), so it has no dense logits: {way_out}"
            )
        head = _head_name(self.model)
        try:
            output = self(images)
        except Exception as error:  # noqa: BLE001 - any head that cannot take a 1 x 1 map
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise TeacherError(
                f"teacher {self.name}: its head ({head}) cannot be applied at every location of "
                f"its final map ({type(error).__name__}: {reason}): {way_out}"
            ) from None
        mean = output.dense_logits.float().mean(dim=(2, 3))
        reference = output.global_logits.float()
        error = (mean - reference).abs().max().item()
        if error > 1e-3 * (1.0 + reference.abs().max().item()):
            raise TeacherError(
                f"teacher {self.name}: its head ({head}) is not affine after global average "
                f"pooling (the mean of its per-location logits differs from its output by "
                f"{error:.3g}: a norm, an activation or an MLP after the pooling), so it has no "
                f"dense logits: {way_out}"
            )


def state_dict_of_child(module: nn.Module, child: str) -> None:
    """Make ``module``'s state dict its submodule ``child``'s own: keys without the ``child.``
    prefix, saved and loaded alike whether ``module`` is the top module or nested in another
    (a training task, a distiller)."""
    module.register_state_dict_post_hook(functools.partial(_drop_prefix, child=child))
    module.register_load_state_dict_pre_hook(functools.partial(_add_prefix, child=child))


def _drop_prefix(module: nn.Module, state: dict, prefix: str, _metadata, *, child: str) -> None:
    ours = [key for key in state if key.startswith(f"{prefix}{child}.")]
    for key in ours:  # popped and put back in order: they are the last keys written
        state[prefix + key[len(prefix) + len(child) + 1 :]] = state.pop(key)


def _add_prefix(module: nn.Module, state: dict, prefix: str, *_, child: str) -> None:
    own = set(module._modules) - {child}  # the wrapper's other parts (a MapStudent's head_dist)
    ours = [key for key in state if key.startswith(prefix)]
    for key in ours:
        name = key[len(prefix) :]
        if name.split(".", 1)[0] not in own and not name.startswith(f"{child}."):
            state[f"{prefix}{child}.{name}"] = state.pop(key)


class TimmModelWrapper(nn.Module):
    """A wrapper of one timm ``model`` whose state dict is the model's own
    (:func:`state_dict_of_child`), so its weights load into ``timm.create_model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        state_dict_of_child(self, "model")


class DistilledStudent(TimmModelWrapper):
    """A student with distillation heads: ``forward(images, output_grid=...)`` gives a
    :class:`StudentOutput` with class, distillation and dense logits, and :meth:`predict`
    combines them under ``inference_rule`` (:func:`combine_heads`; ValueError for an unknown
    rule). The bases of :class:`DenseStudent` and :class:`MapStudent`."""

    def __init__(self, model: nn.Module, *, inference_rule: str) -> None:
        if inference_rule not in INFERENCE_RULES:
            raise ValueError(
                f"unknown inference rule {inference_rule!r}: choose one of {INFERENCE_RULES}"
            )
        super().__init__(model)
        self.inference_rule = inference_rule

    def inference_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Inference logits (N, K) under ``inference_rule``; the dense head sees the mean
        location (a 1 x 1 output grid). Differentiable (:meth:`predict` is not)."""
        return combine_heads(self(images, output_grid=(1, 1)), self.inference_rule)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`inference_logits` without gradients: (N, K)."""
        return self.inference_logits(images)


class DenseStudent(DistilledStudent):
    """A timm ViT that returns :class:`StudentOutput` in train and eval mode alike.

    Its ``state_dict`` is the wrapped timm model's, so it loads into ``timm.create_model(name)``.
    ``inference_rule`` names how :meth:`predict` combines the heads (see :func:`combine_heads`).
    """

    def __init__(self, model: nn.Module, *, inference_rule: str = "cls+dist+patch") -> None:
        if not is_vit(model):
            raise TypeError(
                f"{type(model).__name__} is not a timm Vision Transformer "
                "(it has no patch_embed / num_prefix_tokens)"
            )
        problem = patch_logits_problem(model)
        if problem is not None:
            raise TypeError(f"{type(model).__name__} cannot give patch logits: {problem}")
        super().__init__(model, inference_rule=inference_rule)
        self.distilled = getattr(model, "dist_token", None) is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w): the patch grid for the model's configured image size."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def patch_head(self) -> nn.Module:
        """The head applied to patch tokens: the distillation head, or the class head."""
        return self.model.head_dist if self.distilled else self.model.head

    def grid(self, image_size: int) -> tuple[int, int]:
        """(h, w): the patch grid for ``image_size`` x ``image_size`` inputs: the built grid,
        or, for a ViT built with ``dynamic_img_size``, the grid at that size."""
        return self._grid_for_size((image_size, image_size))

    def _grid_for_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if getattr(self.model, "dynamic_img_size", False):
            return tuple(self.model.patch_embed.dynamic_feat_size(size))
        return self.grid_size

    def _grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        return self._grid_for_size(tuple(images.shape[-2:]))

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


class MapStudent(DistilledStudent):
    """A hierarchical or convolutional timm classifier (Swin, PVTv2, MaxViT, CoAtNet, DaViT,
    ConvNeXt, a ResNet: any model whose ``forward_features`` ends in an H x W map) as a CSKD
    student, returning :class:`StudentOutput` as :class:`DenseStudent` does.

    Its dense logits come from a distillation head beside the model's own class head, as DeiT's
    distillation token has its own: ``norm_dist`` (LayerNorm over the channels, as a ViT's final
    norm before its patch head) then ``head_dist`` (linear, C_f -> K) at every location of the
    final map (N, C_f, H, W), or (N, H, W, C_f) channels-last (timm's ``output_fmt``). The
    locations are pooled to the teacher's grid before the linear head (exact: both are linear),
    and ``dist_logits`` is the head on the mean location: the mean of the dense logits, which
    DeiT's token target trains. ``cls_logits`` is the model's own ``forward_head``. Inference:
    ``cls+dist+patch`` averages the class head with the distillation head twice (its pooled
    patch logits equal ``dist_logits``). The state dict is the timm model's keys plus
    ``norm_dist.*`` and ``head_dist.*``. Not a ViT: those are :class:`DenseStudent`.
    """

    OWN_KEYS = ("norm_dist.", "head_dist.")  # its state-dict keys that are not the timm model's

    def __init__(self, model: nn.Module, *, inference_rule: str = "cls+dist+patch") -> None:
        super().__init__(model, inference_rule=inference_rule)
        self.distilled = True
        self.feature_format = _feature_format(model)
        channels = model.num_features
        self.norm_dist = nn.LayerNorm(channels)
        self.head_dist = nn.Linear(channels, model.num_classes)

    @torch.no_grad()
    def grid(self, image_size: int) -> tuple[int, int]:
        """The final map's (H, W) for ``image_size`` x ``image_size`` inputs (one blank pass)."""
        grids = self.__dict__.setdefault("_grids", {})
        if image_size not in grids:
            parameter = next(self.model.parameters())
            channels = _model_channels(self.model)
            blank = torch.zeros(2, channels, image_size, image_size, device=parameter.device)
            was_training = self.model.training  # eval: no batch-norm statistics move
            self.model.eval()
            try:
                grids[image_size] = self._locations(self.model.forward_features(blank))[1]
            finally:
                self.model.train(was_training)
        return grids[image_size]

    def _locations(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The final map -> (N, H*W, C_f) row-major, and (H, W)."""
        if features.ndim != 4:
            raise TypeError(
                f"{type(self.model).__name__}'s final features are {tuple(features.shape)}, not an "
                "H x W map: it cannot give dense logits (use distill.method=deit)"
            )
        if self.feature_format == "NHWC":
            n, h, w, c = features.shape
            return features.reshape(n, h * w, c), (h, w)
        n, c, h, w = features.shape
        return features.flatten(2).transpose(1, 2), (h, w)

    def forward(
        self,
        images: torch.Tensor,
        *,
        output_grid: tuple[int, int] | None = None,
        with_patches: bool = True,
    ) -> StudentOutput:
        """images (N, C, S, S) -> class logits (N, K), distillation logits (N, K) and, unless
        ``with_patches=False``, dense logits (N, H*W, K) on the final map or on ``output_grid``."""
        features = self.model.forward_features(images)
        cls_logits = self.model.forward_head(features)  # (N, K)
        locations, grid = self._locations(features)  # (N, H*W, C_f)
        locations = self.norm_dist(locations)
        dist_logits = self.head_dist(locations.mean(dim=1))  # (N, K): the mean dense logits
        if not with_patches:
            return StudentOutput(cls_logits, dist_logits, None, grid)
        if output_grid is not None:
            what = f"{type(self.model).__name__}'s final feature map"
            locations = align_to_grid(locations, grid, output_grid, student_map=what)
            grid = tuple(output_grid)
        return StudentOutput(cls_logits, dist_logits, self.head_dist(locations), grid)


def map_student_problem(
    model: nn.Module, image_size: int, in_chans: int | None = None
) -> str | None:
    """Why a non-ViT timm classifier cannot be a :class:`MapStudent` at ``image_size``, or None:
    its final features are not an H x W map (PiT ends in tokens), or it has no
    ``forward_features`` / ``forward_head``. Runs ``forward_features`` once on a blank batch on
    the model's device (the meta device costs nothing)."""
    if not all(hasattr(model, n) for n in ("forward_features", "forward_head", "num_features")):
        return "it has no forward_features / forward_head / num_features (timm's classifier API)"
    parameter = next(model.parameters())
    channels = in_chans or _model_channels(model)
    blank = torch.zeros(2, channels, image_size, image_size, device=parameter.device)
    was_training = model.training  # eval: no batch-norm statistics move
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(blank)
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as error:
        if parameter.device.type == "meta":
            return None  # a model that does not run on the meta device: the real build checks
        return f"its forward pass fails at {image_size} px ({str(error).splitlines()[0]})"
    finally:
        model.train(was_training)
    if not isinstance(features, torch.Tensor):
        return f"its final features are a {type(features).__name__} (several streams), not an H x W map"
    if features.ndim != 4:
        return f"its final features are {tuple(features.shape)}, not an H x W map"
    return None


class PlainClassifier(TimmModelWrapper):
    """Any timm classifier (e.g. a CNN trained as a teacher with method ``none``) behind the
    :class:`StudentOutput` contract: only ``cls_logits`` is set."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.distilled = False

    def forward(self, images: torch.Tensor, **_: object) -> StudentOutput:
        return StudentOutput(self.model(images), None, None, (1, 1))


def is_vit(model: nn.Module) -> bool:
    """A timm Vision Transformer of any family (it has ``patch_embed`` and ``num_prefix_tokens``)."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def patch_logits_problem(model: nn.Module) -> str | None:
    """Why a timm ViT cannot give a :class:`DenseStudent`'s patch logits, or None when it can:
    its patch embedding has no fixed grid (XCiT's convolutional stem, MViTv2's pooling stages
    end at stride 32), or its class token joins after its last block (ConViT shallower than its
    ``local_up_to_layer``). Works on the meta device (no forward pass)."""
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        return (
            f"its patch embedding ({type(model.patch_embed).__name__}) has no fixed patch grid "
            "(grid_size), so its tokens cannot be placed on the teacher's map"
        )
    local = getattr(model, "local_up_to_layer", None)  # ConViT: the class token joins there
    depth = len(getattr(model, "blocks", ()))
    if local is not None and depth <= local:
        return (
            f"its class token joins only after block {local} and it has {depth} blocks, so its "
            f"tokens hold no class token: set student.kwargs.depth above {local}"
        )
    return None


def wrap_student(
    model: nn.Module, *, inference_rule: str = "cls+dist+patch", method: str = "deit"
) -> DenseStudent | MapStudent | PlainClassifier:
    """A ViT that can give patch logits becomes a :class:`DenseStudent`; under ``method="cskd"``
    any other classifier (a hierarchical model, a CNN) a :class:`MapStudent` (its own
    distillation head on the final map); otherwise (``deit``, ``none``) a
    :class:`PlainClassifier`, trained on its one head as before."""
    if is_vit(model) and patch_logits_problem(model) is None:
        return DenseStudent(model, inference_rule=inference_rule)
    if method == "cskd" and not is_vit(model):
        return MapStudent(model, inference_rule=inference_rule)
    return PlainClassifier(model)


def rules_for(student: nn.Module) -> tuple[str, ...]:
    """The inference rules that differ for this student (all three for a ViT or a
    :class:`MapStudent`, ``cls`` for a plain classifier)."""
    return INFERENCE_RULES if isinstance(student, DistilledStudent) else ("cls",)
