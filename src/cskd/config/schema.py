"""The schema: every config section and key, each with its type, default, bound or choices and
help text beside it (:func:`setting`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..method.adapters import INFERENCE_RULES
from ..method.losses import LOSS_KINDS, METHODS
from ..method.schedules import PROGRESS_UNITS, SCHEDULES

# the datasets data.build knows (a new one is added there and here)
DATASETS = ("folder", "fashion_mnist", "translated_fashion_mnist", "synthetic")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Bound = Literal["positive", "non_negative", "probability"]

# Each bound: the test a value must pass, and what the error says when it does not.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda value: value > 0, "must be positive"),
    "non_negative": (lambda value: value >= 0, "must not be negative"),
    "probability": (lambda value: 0.0 <= value <= 1.0, "must lie in [0, 1]"),
}


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple[str, ...] = (),
    bound: Bound | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field carrying its help text and, optionally, its allowed values (``choices``)
    or a numeric ``bound``; ``factory`` builds a mutable default (as ``default_factory``)."""
    metadata = {"help": help, "choices": tuple(choices), "bound": bound}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class StudentConfig:
    name: str = setting(
        "deit_tiny_distilled_patch16_224",
        help="a timm classifier: a ViT, or under cskd also a hierarchical or convolutional model "
        "(a distillation head on its final map)",
    )
    kwargs: dict = setting(factory=dict, help="passed to timm.create_model (img_size, depth...)")
    drop_path: float = setting(
        0.1, bound="non_negative", help="stochastic depth rate (timm drop_path_rate)"
    )
    inference_rule: str = setting(
        "auto",
        choices=("auto", *INFERENCE_RULES),
        help="auto (the method's own) | " + " | ".join(INFERENCE_RULES),
    )
    checkpoint: str = setting(
        "",
        help="initial weights: a local file (.safetensors, state dict, DeiT/timm/cskd "
        "checkpoint) or a cskd run directory; heads of another class count are "
        "re-initialised, position embeddings resampled to the patch grid, input channels "
        'adapted (docs/design.md "Initial weights")',
    )
    pretrained_tag: str = setting("", help="or a timm tag (e.g. fb_in1k) fetched from timm's hub")
    checkpoint_ema: bool = setting(
        False, help="take the file's EMA weights (state_dict_ema, model_ema, ema)"
    )
    reset_head: bool = setting(
        False, help="re-initialise the heads even when their class count fits"
    )
    trainable: str = setting(
        "all",
        choices=("all", "head"),
        help="all | head: only the classifier heads train (a linear probe)",
    )


@dataclass
class TeacherConfig:
    name: str = setting(
        "regnety_160",
        help="a timm classifier; under cskd one whose head is affine after global average pooling "
        "(a CNN, ResNetV2, DLA, Swin: linear or 1x1-conv heads)",
    )
    checkpoint: str = setting("", help='local .safetensors / state dict / {"model": ...}')
    pretrained_tag: str = setting("", help="or a timm tag (e.g. deit_in1k) fetched from timm's hub")
    kwargs: dict = setting(factory=dict, help="passed to timm.create_model (e.g. output_stride)")
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, help="the teacher's own input normalisation")
    std: tuple[float, ...] = setting(IMAGENET_STD, help="the teacher's own input normalisation")
    amp: str = setting(
        "auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="the teacher's precision: auto (fp16 on GPU, as released; fp32 on CPU) | fp32 | "
        "fp16 | bf16 (docs/results/teacher_precision.md: bf16 flips ~10x more hard targets "
        "than fp16)",
    )
    cache: str = setting(
        "",
        help="the teacher's responses read from a cache (`cskd cache` builds it; "
        'docs/results/cache.md says what it follows exactly): "" = the teacher runs in every '
        "training step",
    )
    cache_size: int = setting(
        0,
        bound="non_negative",
        help="`cskd cache`: the whole image's size for the teacher (0 = data.image_size: a "
        "teacher answers best at its training size; at twice it, docs/results/cache.md's "
        "agreement fell 3x)",
    )
    cache_topk: int = setting(
        0,
        bound="non_negative",
        help="`cskd cache`: keep the k largest logits per cell (0 = every class)",
    )
    cache_dtype: str = setting(
        "float16",
        choices=("float16", "float32"),
        help="`cskd cache`: float16 | float32 storage of the logits",
    )
    cache_shard_size: int = setting(
        1024, bound="positive", help="`cskd cache`: images per shard file"
    )
    memory_format: str = setting(
        "auto",
        choices=("auto", "channels_last", "contiguous"),
        help="auto (channels_last on a GPU) | channels_last | contiguous",
    )


@dataclass
class DataConfig:
    dataset: str = setting(
        "folder",
        choices=DATASETS,
        help=" | ".join(DATASETS) + " (folder: train/ and val/ class folders, ImageNet's layout)",
    )
    root: str = setting(
        "",
        help='folder: contains train/ and val/; fashion_mnist: "" = the Debian package',
    )
    download: bool = setting(
        False, help="fashion_mnist only: torchvision's downloader when files are missing"
    )
    num_classes: int = setting(
        1000, bound="positive", help="classes of the data (student and teacher heads)"
    )
    image_size: int = setting(
        224, bound="positive", help="training and evaluation size in pixels (square)"
    )
    in_chans: int = setting(3, bound="positive", help="image channels (1 for Fashion-MNIST)")
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, help="the student's input normalisation")
    std: tuple[float, ...] = setting(IMAGENET_STD, help="the student's input normalisation")
    batch_size: int = setting(128, bound="positive", help="per process")
    eval_batch_size: int = setting(0, bound="non_negative", help="0 = 2 x batch_size")
    workers: int = setting(
        8,
        bound="non_negative",
        help="data loader worker processes per process (they persist across epochs)",
    )
    prefetch_factor: int = setting(
        2, bound="positive", help="batches each loader worker keeps ready"
    )
    train_subset: int = setting(
        0,
        bound="non_negative",
        help="0 = every training image; N = a fixed random subset of N",
    )
    subset_seed: int = setting(0, help="seed of the train_subset / val_split choice")
    val_split: int = setting(
        0,
        bound="non_negative",
        help="N > 0: hold out N training images as validation (test set untouched)",
    )
    synthetic_size: int = setting(64, help="synthetic: training images (validation: a quarter)")
    canvas_size: int = setting(
        64, help="translated_fashion_mnist: the canvas the 28 px garment is placed on"
    )
    clutter: int = setting(
        0, help="translated_fashion_mnist: fragments of other garments on each canvas"
    )
    skip_corrupt: bool = setting(False, help="skip unreadable images instead of stopping")
    eval_crop_pct: float = setting(
        0.875, help="evaluation: resize to image_size / eval_crop_pct, centre crop"
    )


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = setting((0.08, 1.0), help="RandomResizedCrop area range")
    hflip: float = setting(0.5, bound="probability", help="horizontal flip probability")
    randaugment: str = setting("rand-m9-mstd0.5-inc1", help='"" = off')
    color_jitter: float = setting(0.3, help="used only when randaugment is off (as timm)")
    interpolation: str = setting(
        "bicubic",
        choices=("bicubic", "bilinear", "nearest"),
        help="resize interpolation for training and evaluation",
    )
    reprob: float = setting(0.25, bound="probability", help="random erasing probability")
    mixup: float = setting(0.8, help="Mixup alpha (0 = off)")
    cutmix: float = setting(1.0, help="CutMix alpha (0 = off)")
    mixup_switch_prob: float = setting(
        0.5,
        bound="probability",
        help="chance of CutMix instead of Mixup when both are on",
    )
    label_smoothing: float = setting(
        0.1, bound="probability", help="label smoothing of the base loss"
    )
    repeated_aug: bool = setting(True, help="repeated augmentation (3 copies per image, DeiT)")


@dataclass
class DistillConfig:
    method: str = setting("cskd", choices=METHODS, help=" | ".join(METHODS))
    alpha: float = setting(
        0.5, bound="probability", help="token-loss weight; base loss gets 1 - alpha"
    )
    token_kind: str = setting(
        "hard", choices=LOSS_KINDS, help="DeiT token loss: " + " | ".join(LOSS_KINDS)
    )
    cskd_kind: str = setting(
        "hard", choices=LOSS_KINDS, help="CSKD loss: " + " | ".join(LOSS_KINDS)
    )
    cskd_weight: float = setting(
        1.0, bound="non_negative", help="weight of the CSKD loss (1.0 as released)"
    )
    schedule: str = setting(
        "linear", choices=SCHEDULES, help="the CKF schedule a(t): " + " | ".join(SCHEDULES)
    )
    progress: str = setting("epoch", choices=PROGRESS_UNITS, help="epoch (as released) | step")
    tau: float = setting(1.0, bound="positive", help="temperature of the soft losses")


@dataclass
class OptimConfig:
    name: str = setting("adamw", help="any timm optimizer name")
    lr: float = setting(
        5e-4,
        bound="positive",
        help="at lr_batch_reference images; scaled linearly with the global batch",
    )
    lr_batch_reference: int = setting(512, bound="positive", help="the batch optim.lr is given for")
    weight_decay: float = setting(
        0.05,
        bound="non_negative",
        help="AdamW weight decay (not on norms, biases, tokens)",
    )
    clip_grad: float = setting(0.0, bound="non_negative", help="0 = off")
    epochs: int = setting(300, bound="positive", help="training epochs")
    warmup_epochs: int = setting(
        5, bound="non_negative", help="linear warm-up epochs from warmup_lr"
    )
    warmup_lr: float = setting(
        1e-6,
        bound="non_negative",
        help="not scaled with the batch (as DeiT); must stay below the peak",
    )
    min_lr: float = setting(
        1e-5,
        bound="non_negative",
        help="not scaled with the batch (as DeiT); must stay below the peak",
    )
    schedule_unit: str = setting(
        "step",
        choices=("step", "epoch"),
        help="step: lr updated every step | epoch: once per epoch (DeiT)",
    )


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/default", help="the run directory")
    seed: int = setting(0, help="initialisation, data order and augmentation seed")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    amp: str = setting(
        "auto",
        choices=("auto", "off", "bf16", "fp16"),
        help="auto (bf16 on GPU, off on CPU) | off | bf16 | fp16",
    )
    ema: bool = setting(True, help="keep an EMA of the student's weights (timm ModelEmaV3)")
    ema_decay: float = setting(0.99996, bound="probability", help="EMA decay per step")
    log_interval: int = setting(
        50, bound="positive", help="steps between log lines and metrics records"
    )
    resume: str = setting("", help='"" | auto | path to a checkpoint')
    overwrite: bool = setting(False, help="allow an output_dir that holds another run")
    best_rule: str = setting("auto", help='auto (the method\'s own rule) | a rule | "ema/<rule>"')
    checkpoint_interval: int = setting(
        0,
        bound="non_negative",
        help="also save last.pt every N steps (0 = at epoch ends only)",
    )
    stop_after_steps: int = setting(
        0, help="save last.pt and stop after N global steps (0 = run to the end)"
    )
    max_steps_per_epoch: int = setting(
        0,
        bound="non_negative",
        help="0 = the whole epoch; N = stop each epoch after N steps",
    )
    eval_max_batches: int = setting(0, bound="non_negative", help="0 = the whole validation set")
    eval_test: bool = setting(
        False, help="with data.val_split > 0: also evaluate the official test split"
    )
    eval_interval: int = setting(
        1,
        bound="positive",
        help="evaluate after every N-th epoch (and always after the last)",
    )
    diagnostics: bool = setting(
        False, help="log teacher-map, student-agreement and attention diagnostics"
    )
    diagnostics_images: int = setting(
        256, bound="positive", help="validation images the diagnostics are measured on"
    )
    channels_last: bool = setting(False, help="channels-last memory format for the student")
    compile: bool = setting(False, help="torch.compile the student and the teacher")
    compile_backend: str = setting(
        "inductor", help="torch.compile backend (e.g. eager, to test tracing)"
    )
    dist_backend: str = setting(
        "auto",
        choices=("auto", "nccl", "gloo"),
        help="auto (nccl on GPU, gloo on CPU) | nccl | gloo",
    )
    dist_timeout_s: int = setting(
        1800, bound="positive", help="torchrun collective timeout in seconds"
    )


@dataclass
class Config:
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# PyYAML (YAML 1.1) reads "1e-3" and "5e-4" as strings; float fields accept such numbers.


def get_value(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
