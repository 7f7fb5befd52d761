"""Tests for cskd.data: IDX reading, datasets, transforms and the train/val split."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from cskd.data import (
    FASHION_MNIST_ROOT,
    DataError,
    EvalTransform,
    FashionMNIST,
    ImageFolderDataset,
    SyntheticImages,
    TrainTransform,
    build_datasets,
    check_class_folders,
    make_sample,
    read_idx,
    split_indices,
    verify_images,
)

SAMPLE_KEYS = {"image", "target", "index", "crop", "flip"}


def write_idx(path: Path, array: torch.Tensor, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    payload = header + array.numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def random_image(
    *, width: int, height: int, mode: str = "RGB", seed: int = 0, smooth: bool = False
) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    if smooth:  # low-frequency content, so resampling details barely matter
        low = torch.rand(1, channels, 4, 5, generator=generator)
        full = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear")[0]
        array = (full * 255).round().to(torch.uint8).permute(1, 2, 0)
    else:
        array = torch.randint(0, 256, (height, width, channels), generator=generator)
        array = array.to(torch.uint8)
    return Image.fromarray(array.numpy() if channels == 3 else array[:, :, 0].numpy())


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def data_config(**overrides):
    values = dict(
        dataset="synthetic",
        root="",
        image_size=16,
        in_chans=3,
        num_classes=4,
        download=False,
        train_subset=0,
        subset_seed=0,
        val_split=0,
        synthetic_size=40,
        skip_corrupt=False,
        eval_crop_pct=1.0,
        mean=(0.485, 0.456, 0.406),
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def augment_config(**overrides):
    values = dict(
        scale=(0.08, 1.0), hflip=0.5, randaugment="", color_jitter=0.0, interpolation="bicubic"
    )
    values.update(overrides)
    return SimpleNamespace(**values)


# ------------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 9, 3, 3, 1], dtype=torch.uint8)
    write_idx(tmp_path / "images", images, compress=compress)
    write_idx(tmp_path / "labels", labels, compress=compress)
    assert torch.equal(read_idx(tmp_path / "images"), images)
    assert torch.equal(read_idx(tmp_path / "labels"), labels)


def test_read_idx_rejects_truncated_corrupt_and_missing(tmp_path):
    path = tmp_path / "images"
    write_idx(path, torch.zeros(4, 2, 2, dtype=torch.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)

    gz_path = tmp_path / "images.gz"
    write_idx(gz_path, torch.zeros(50, 8, 8, dtype=torch.uint8), compress=True)
    gz_path.write_bytes(gz_path.read_bytes()[:20])
    with pytest.raises(DataError, match="gzip") as caught:
        read_idx(gz_path)
    assert str(gz_path) in str(caught.value)

    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x00")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)

    with pytest.raises(DataError, match="not found") as caught:
        read_idx(tmp_path / "missing")
    assert "missing" in str(caught.value)


# ------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_train():
    return FashionMNIST(split="train")


def test_fashion_mnist_reads_debian_files(fashion_train):
    test = FashionMNIST(split="test", transform=EvalTransform(image_size=32, crop_pct=1.0))
    assert len(fashion_train) == 60000 and len(test) == 10000
    assert fashion_train.images.shape == (60000, 28, 28)
    assert fashion_train.images.dtype == torch.uint8
    assert int(fashion_train.labels.min()) == 0 and int(fashion_train.labels.max()) == 9
    assert torch.bincount(test.labels.long()).tolist() == [1000] * 10
    assert len(test.classes) == 10 and test.classes[9] == "Ankle boot"

    raw = fashion_train[5]
    assert raw["image"].shape == (1, 28, 28)
    assert torch.equal((raw["image"][0] * 255).round().to(torch.uint8), fashion_train.images[5])
    assert raw["target"] == int(fashion_train.labels[5])
    assert raw["crop"].tolist() == [0, 0, 28, 28]
    sample = test[3]
    assert sample["image"].shape == (1, 32, 32) and sample["index"] == 3


def test_fashion_mnist_indices_select_and_renumber():
    full = FashionMNIST(split="test")
    subset = FashionMNIST(split="test", indices=[10, 3])
    assert len(subset) == 2
    assert subset[0]["index"] == 0 and subset[0]["target"] == int(full.labels[10])
    assert torch.allclose(subset[1]["image"][0], full.images[3].float() / 255)
    with pytest.raises(DataError, match="indices"):
        FashionMNIST(split="test", indices=[10000])


def test_fashion_mnist_missing_root_error(tmp_path):
    with pytest.raises(DataError) as caught:
        FashionMNIST(root=tmp_path / "nowhere", split="test")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message
    assert FASHION_MNIST_ROOT == "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_download_reads_torchvision_layout(tmp_path, monkeypatch):
    calls = []

    def fake_torchvision_fashion(root, train, download):
        calls.append((root, download))
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        write_idx(
            raw / "t10k-images-idx3-ubyte", torch.ones(3, 28, 28, dtype=torch.uint8), compress=False
        )
        write_idx(
            raw / "t10k-labels-idx1-ubyte",
            torch.tensor([1, 2, 3], dtype=torch.uint8),
            compress=False,
        )

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_torchvision_fashion)
    dataset = FashionMNIST(root=tmp_path, split="test", download=True)
    assert calls == [(str(tmp_path), True)]
    assert len(dataset) == 3 and dataset[2]["target"] == 3


# ------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_batches():
    transform = EvalTransform(image_size=12, crop_pct=1.0)
    first = SyntheticImages(size=10, num_classes=3, image_size=12, seed=7, transform=transform)
    second = SyntheticImages(size=10, num_classes=3, image_size=12, seed=7, transform=transform)
    other_seed = SyntheticImages(size=10, num_classes=3, image_size=12, seed=8, transform=transform)
    assert torch.equal(first[4]["image"], second[4]["image"])
    assert torch.equal(first[4]["image"], first[4]["image"])
    assert not torch.equal(first[4]["image"], first[5]["image"])
    assert not torch.equal(first[4]["image"], other_seed[4]["image"])

    sample = first[4]
    assert set(sample) == SAMPLE_KEYS
    assert sample["image"].shape == (3, 12, 12) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["target"] == 4 % 3 and sample["index"] == 4
    assert sample["crop"].dtype == torch.float32 and sample["crop"].tolist() == [0, 0, 12, 12]
    assert sample["flip"].dtype == torch.bool and not bool(sample["flip"])

    batch = next(iter(DataLoader(first, batch_size=4)))
    assert batch["image"].shape == (4, 3, 12, 12)
    assert batch["target"].tolist() == [0, 1, 2, 0]
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["crop"].shape == (4, 4) and batch["crop"].dtype == torch.float32
    assert batch["flip"].shape == (4,) and batch["flip"].dtype == torch.bool

    gray = SyntheticImages(size=2, num_classes=2, image_size=8, channels=1)
    assert gray[1]["image"].shape == (1, 8, 8)


def test_synthetic_class_signal_is_learnable():
    dataset = SyntheticImages(size=60, num_classes=3, image_size=16)
    images = torch.stack([dataset[i]["image"] for i in range(60)])
    targets = torch.arange(60) % 3
    means = torch.stack([images[targets == c].mean(0) for c in range(3)])
    held_out = SyntheticImages(size=30, num_classes=3, image_size=16, seed=1)
    test_images = torch.stack([held_out[i]["image"] for i in range(30)])
    distances = ((test_images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    accuracy = (distances.argmin(1) == torch.arange(30) % 3).float().mean()
    assert accuracy > 0.9


# ------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("hflip", [0.0, 0.5, 1.0])
def test_train_transform_crop_and_flip_describe_the_output(hflip):
    image = random_image(width=50, height=40, seed=1)
    transform = TrainTransform(image_size=16, hflip=hflip, randaugment="", scale=(0.2, 1.0))
    flips = set()
    for seed in range(8):
        seed_all(seed)
        tensor, crop, flip = transform(image)
        top, left, height, width = crop.tolist()
        assert 0 <= top and top + height <= 40 and 0 <= left and left + width <= 50
        expected = TF.resized_crop(
            image, top, left, height, width, [16, 16], TF.InterpolationMode.BICUBIC
        )
        if bool(flip):
            expected = TF.hflip(expected)
        assert torch.equal(tensor, TF.to_tensor(expected))
        flips.add(bool(flip))
    assert flips == {False: {False}, 0.5: {False, True}, 1.0: {True}}[hflip]


def test_train_transform_randaugment_rgb_and_gray_reproducible():
    transform = TrainTransform(image_size=16, randaugment="rand-m9-mstd0.5-inc1")
    rgb = random_image(width=20, height=20, seed=2)
    gray = random_image(width=20, height=20, mode="L", seed=3)
    outputs = []
    for _ in range(2):
        seed_all(11)
        outputs.append(
            [transform(rgb)[0] for _ in range(4)] + [transform(gray)[0] for _ in range(30)]
        )
    for first, second in zip(*outputs, strict=True):
        assert torch.equal(first, second)
    assert outputs[0][0].shape == (3, 16, 16) and outputs[0][-1].shape == (1, 16, 16)


def test_train_transform_rejects_bad_config():
    with pytest.raises(DataError, match="randaugment"):
        TrainTransform(image_size=16, randaugment="auto-v0")
    with pytest.raises(DataError, match="interpolation"):
        TrainTransform(image_size=16, interpolation="sideways")


def test_make_sample_uses_transform_result():
    image = random_image(width=6, height=4)

    def transform(_image):
        return torch.zeros(3, 2, 2), torch.tensor([1, 2, 3, 4]), torch.tensor(True)

    sample = make_sample(image, 2, 9, transform)
    assert sample["crop"].tolist() == [1, 2, 3, 4] and bool(sample["flip"])
    assert sample["target"] == 2 and sample["index"] == 9
    plain = make_sample(image, 0, 0, None)
    assert plain["image"].shape == (3, 4, 6) and plain["crop"].tolist() == [0, 0, 4, 6]


# ------------------------------------------------------------------------------- image folders


def make_tree(root: Path, *, classes_by_split: dict[str, list[str]], per_class: int = 2) -> None:
    for split, classes in classes_by_split.items():
        for class_number, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(per_class):
                image = random_image(width=10, height=8, seed=class_number * 10 + number)
                image.save(folder / f"img{number}.png")


def test_image_folder_reads_and_reports_corrupt_files(tmp_path):
    make_tree(tmp_path, classes_by_split={"train": ["cat", "dog"], "val": ["cat", "dog"]})
    good = (tmp_path / "train" / "cat" / "img1.png").read_bytes()
    truncated = tmp_path / "train" / "cat" / "img0.png"
    truncated.write_bytes(good[: len(good) // 2])
    junk = tmp_path / "train" / "dog" / "img1.png"
    junk.write_bytes(b"not an image at all")

    dataset = ImageFolderDataset(root=tmp_path, split="train")
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    sample = dataset[1]
    assert set(sample) == SAMPLE_KEYS and sample["image"].shape == (3, 8, 10)
    assert sample["target"] == 0
    with pytest.raises(DataError, match="skip_corrupt") as caught:
        dataset[0]
    assert str(truncated) in str(caught.value)
    assert verify_images(dataset) == [str(truncated), str(junk)]
    assert verify_images(dataset.paths, limit=1) == [str(truncated)]

    skipping = ImageFolderDataset(root=tmp_path, split="train", skip_corrupt=True)
    substitute = skipping[0]
    assert torch.equal(substitute["image"], skipping[1]["image"])
    assert substitute["index"] == 0 and skipping.num_skipped == 1
    wrapped = skipping[3]  # dog/img1 is junk: wraps around to cat/img0 (truncated), then cat/img1
    assert torch.equal(wrapped["image"], skipping[1]["image"])
    assert skipping.num_skipped == 3


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found") as caught:
        ImageFolderDataset(root=tmp_path, split="train")
    assert str(tmp_path / "train") in str(caught.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(root=tmp_path, split="train")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images") as caught:
        ImageFolderDataset(root=tmp_path, split="train")
    assert "\n" not in str(caught.value)


def test_check_class_folders(tmp_path):
    make_tree(tmp_path, classes_by_split={"train": ["a", "b"], "val": ["a", "b"]}, per_class=1)
    check_class_folders(tmp_path)
    (tmp_path / "val" / "c").mkdir()
    for name in ["x1", "x2", "x3", "x4", "x5", "x6"]:
        (tmp_path / "train" / name).mkdir()
    with pytest.raises(DataError, match="class folders differ") as caught:
        check_class_folders(tmp_path)
    message = str(caught.value)
    assert "train/x1" in message and "and 2 more" in message and "\n" not in message


def test_build_datasets_folder(tmp_path):
    make_tree(tmp_path, classes_by_split={"train": ["a", "b"], "val": ["a", "b"]}, per_class=3)
    config = data_config(dataset="folder", root=str(tmp_path), num_classes=2, val_split=2)
    train, val = build_datasets(config, augment_config())
    assert len(train) == 4 and len(val) == 2
    assert set(train.paths).isdisjoint(val.paths)
    assert verify_images(train) == []
    assert val[1]["image"].shape == (3, 16, 16) and val[1]["index"] == 1

    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(DataError, match="class folders differ"):
        build_datasets(
            data_config(dataset="folder", root=str(tmp_path), num_classes=2), augment_config()
        )
    with pytest.raises(DataError, match="data.num_classes=2"):
        build_datasets(
            data_config(dataset="folder", root=str(tmp_path), num_classes=5, val_split=1),
            augment_config(),
        )


# ------------------------------------------------------------------------------- splits


def test_split_indices_disjoint_and_deterministic():
    train, val = split_indices(size=100, train_subset=30, val_split=20, seed=3)
    assert len(train) == 30 and len(val) == 20 and set(train).isdisjoint(val)
    assert (train, val) == split_indices(size=100, train_subset=30, val_split=20, seed=3)
    assert train != split_indices(size=100, train_subset=30, val_split=20, seed=4)[0]
    assert split_indices(size=100, train_subset=0, val_split=0, seed=3) == (None, None)
    rest, held_out = split_indices(size=100, train_subset=0, val_split=10, seed=3)
    assert sorted(rest + held_out) == list(range(100))
    subset_only, official = split_indices(size=100, train_subset=30, val_split=0, seed=3)
    assert official is None and set(subset_only) == set(train_only_permutation(100, 3)[:30])
    with pytest.raises(DataError, match="val_split"):
        split_indices(size=10, train_subset=5, val_split=6, seed=0)


def train_only_permutation(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def test_build_datasets_synthetic_subset_and_val_split():
    config = data_config(train_subset=12, val_split=8, subset_seed=5)
    train, val = build_datasets(config, augment_config(randaugment="rand-m9-mstd0.5-inc1"))
    assert len(train) == 12 and len(val) == 8
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert isinstance(val.dataset.transform, EvalTransform)
    assert isinstance(train.dataset.transform, TrainTransform)
    # The held-out images are training images seen through the eval transform.
    source = int(val.indices[0])
    plain = SyntheticImages(size=40, num_classes=4, image_size=16)[source]["image"]
    assert torch.equal(val[0]["image"], plain) and val[0]["index"] == 0
    assert torch.equal(val[0]["image"], val[0]["image"])

    again_train, again_val = build_datasets(config, augment_config())
    assert torch.equal(train.indices, again_train.indices)
    assert torch.equal(val.indices, again_val.indices)

    official_train, official_val = build_datasets(data_config(), augment_config())
    assert len(official_train) == 40 and len(official_val) == 10
    assert isinstance(official_val.transform, EvalTransform)
    with pytest.raises(DataError, match="unknown data.dataset"):
        build_datasets(data_config(dataset="imagenet"), augment_config())


def test_build_datasets_fashion_mnist_val_split(fashion_train):
    config = data_config(
        dataset="fashion_mnist",
        in_chans=1,
        num_classes=10,
        image_size=32,
        train_subset=100,
        val_split=50,
        subset_seed=1,
    )
    train, val = build_datasets(config, augment_config())
    assert len(train) == 100 and len(val) == 50
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    sample = val[0]
    assert sample["image"].shape == (1, 32, 32)
    assert sample["target"] == int(fashion_train.labels[int(val.indices[0])])
    assert train[0]["image"].shape == (1, 32, 32)
    with pytest.raises(DataError, match="in_chans=1"):
        build_datasets(data_config(dataset="fashion_mnist", num_classes=10), augment_config())


# ------------------------------------------------------------------ the standard eval protocol


@pytest.mark.parametrize("index", range(9))
def test_eval_transform_is_pixel_equal_to_timm_and_deit_eval(index):
    """Resize(floor(224 / 0.875) = 256, bicubic) + CenterCrop(224), on real photos of several
    sizes and aspect ratios: the same pixels as timm's eval transform and DeiT's torchvision one."""
    import timm.data
    import torchvision.transforms as T
    from photos import photos

    photo = photos()[index]
    tensor, crop, flip = EvalTransform(image_size=224, crop_pct=0.875)(photo)
    deit = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    assert torch.equal(tensor, deit(photo))
    timm_eval = timm.data.create_transform(
        224,
        is_training=False,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    assert torch.equal(tensor, timm_eval(photo))
    assert tensor.shape == (3, 224, 224) and not bool(flip)
    # the crop box is the region of the photo that the output shows
    top, left, height, width = crop.tolist()
    scale = min(photo.width, photo.height) / 256
    assert height == pytest.approx(224 * scale, rel=0.01) and width == pytest.approx(
        224 * scale, rel=0.01
    )
    assert top + height <= photo.height + 1e-3 and left + width <= photo.width + 1e-3
    assert top == pytest.approx((photo.height - height) / 2, abs=scale)
    assert left == pytest.approx((photo.width - width) / 2, abs=scale)
    if min(photo.size) >= 128:  # the box, cropped and resized, shows the same picture
        region = TF.resized_crop(
            photo,
            round(top),
            round(left),
            round(height),
            round(width),
            [224, 224],
            TF.InterpolationMode.BICUBIC,
        )
        assert (TF.to_tensor(region) - tensor).abs().mean() < 0.03


def test_eval_transform_at_crop_pct_1_resizes_a_square_image_whole():
    small = random_image(width=28, height=28, mode="L")
    tensor, crop, _ = EvalTransform(image_size=32, crop_pct=1.0)(small)
    assert crop.tolist() == [0, 0, 28, 28] and tensor.shape == (1, 32, 32)
    expected = TF.to_tensor(small.resize((32, 32), Image.BICUBIC))
    assert torch.equal(tensor, expected)


# ------------------------------------------------------------------ translated Fashion-MNIST


def test_translated_fashion_mnist_places_each_garment_by_its_index():
    from cskd.data import TranslatedFashionMNIST

    plain = FashionMNIST(split="test")
    translated = TranslatedFashionMNIST(split="test", canvas_size=64)
    again = TranslatedFashionMNIST(split="test", canvas_size=64, indices=[7, 3])
    placements = set()
    for index in (3, 7, 100):
        sample = translated[index]
        canvas = (sample["image"][0] * 255).round().to(torch.uint8)  # (64, 64)
        top, left = translated.placement(index)
        placements.add((top, left))
        assert canvas.shape == (64, 64) and sample["target"] == plain[index]["target"]
        garment = (plain[index]["image"][0] * 255).round().to(torch.uint8)
        assert torch.equal(canvas[top : top + 28, left : left + 28], garment)
        outside = canvas.clone()
        outside[top : top + 28, left : left + 28] = 0
        assert int(outside.max()) == 0  # no clutter: black elsewhere
    assert len(placements) == 3  # positions vary with the index
    assert torch.equal(again[0]["image"], translated[7]["image"])  # the same canvas in a subset
    assert again[0]["index"] == 0


def test_translated_fashion_mnist_clutter_comes_from_other_garments():
    from cskd.data import TranslatedFashionMNIST

    clean = TranslatedFashionMNIST(split="test", canvas_size=64)
    cluttered = TranslatedFashionMNIST(split="test", canvas_size=64, clutter=6, fragment_size=10)
    other_seed = TranslatedFashionMNIST(split="test", canvas_size=64, clutter=6, placement_seed=1)
    index = 5
    top, left = cluttered.placement(index)
    image, base = cluttered[index]["image"][0], clean[index]["image"][0]
    assert cluttered.placement(index) == clean.placement(index)
    assert (image >= base).all()  # pixel-wise maximum: the garment is never covered
    outside = image.clone()
    outside[top : top + 28, left : left + 28] = 0
    assert float(outside.max()) > 0  # fragments landed outside the garment
    assert not torch.equal(other_seed[index]["image"], cluttered[index]["image"])
    with pytest.raises(DataError, match="canvas_size"):
        TranslatedFashionMNIST(split="test", canvas_size=20)


def test_build_datasets_gives_translated_fashion_mnist_at_the_recipe_size():
    data_cfg = SimpleNamespace(
        dataset="translated_fashion_mnist",
        root="",
        download=False,
        num_classes=10,
        image_size=64,
        in_chans=1,
        mean=(0.1,),
        std=(0.2,),
        train_subset=100,
        val_split=0,
        subset_seed=0,
        eval_crop_pct=1.0,
        canvas_size=64,
        clutter=2,
        skip_corrupt=False,
    )
    augment_cfg = SimpleNamespace(
        scale=(0.75, 1.0), hflip=0.5, randaugment="", color_jitter=0.0, interpolation="bicubic"
    )
    train, test = build_datasets(data_cfg, augment_cfg)
    assert len(train) == 100 and len(test) == 10_000
    assert train[0]["image"].shape == test[0]["image"].shape == (1, 64, 64)
    assert test.clutter == 2 and test.split == "test"
