"""Image decoding of every Pillow mode, and images of the wrong size.

Each case writes a real file of one mode into ``tmp_path`` (PNG, TIFF, GIF, BMP, PGM), reads it
through ``RobustImageFolder`` (or a DataModule's dataloader) and checks the decoded pixel values:
8-bit modes keep their values (alpha dropped), 16-bit gray is ``v / 65535``, float gray is taken
as [0, 1]; out-of-range values and unknown modes are refused naming the file.
"""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from datamodules import (
    CIFAR10_CLASSES,
    BadImageError,
    CIFAR10DataModule,
    ImageNetSubsetDataModule,
    ImageSizeError,
    RobustImageFolder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOUR = (10, 200, 30)


def _png16(path, arr: np.ndarray) -> None:
    """Minimal 16-bit-per-channel PNG writer: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA."""
    h, w = arr.shape[:2]
    color_type = {2: 0, 3: 2, 4: 6}[arr.ndim if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _gray16(values) -> np.ndarray:
    return np.array([values[:2], values[2:]], np.uint16)


def _palette(transparent: bool) -> Image.Image:
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[0, 0], arr[0, 1], arr[1, 0], arr[1, 1] = COLOUR, (250, 5, 100), (0, 0, 0), (0, 0, 0)
    img = Image.fromarray(arr).quantize(3)
    if transparent:
        img.info["transparency"] = img.getpixel((0, 0))  # COLOUR's index is fully transparent
    return img


# name -> (write(path_stem) -> path, expected mode after open, expected float RGB of pixels (0,0), (0,1))
def _save(img: Image.Image, ext: str):
    def write(stem):
        path = stem.with_suffix(ext)
        img.save(path, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
        return path
    return write


def _raw16(arr: np.ndarray):
    def write(stem):
        path = stem.with_suffix(".png")
        _png16(path, arr)
        return path
    return write


def _pgm16(values):
    def write(stem):
        path = stem.with_suffix(".pgm")
        path.write_bytes(b"P5\n2 2\n65535\n" + np.asarray(values, ">u2").tobytes())
        return path
    return write


def _rgb8(*pixels):
    return [tuple(c / 255 for c in p) for p in pixels]


def _gray(*levels):
    return [(v / 255,) * 3 for v in levels]


rgba = np.zeros((2, 2, 4), np.uint8)
rgba[0, 0], rgba[0, 1] = (*COLOUR, 0), (250, 5, 100, 128)
rgb48 = np.zeros((2, 2, 3), np.uint16)
rgb48[0, 0], rgb48[0, 1] = (150 * 257, 65535, 0), (0x12FF, 7 * 257, 255 * 257)
rgba64 = np.zeros((2, 2, 4), np.uint16)
rgba64[0, 0], rgba64[0, 1] = (150 * 257, 65535, 0, 0), (7 * 257, 255 * 257, 3 * 257, 0x8000)
bilevel = Image.fromarray(np.array([[255, 0], [0, 255]], np.uint8)).convert("1")

CASES = {
    "1_bmp": (_save(bilevel, ".bmp"), "1", _gray(255, 0)),
    "L_png": (_save(Image.fromarray(np.array([[77, 3], [0, 0]], np.uint8)), ".png"), "L", _gray(77, 3)),
    "LA_png": (_save(Image.new("LA", (2, 2), (77, 0)), ".png"), "LA", _gray(77, 77)),
    "LA_tif": (_save(Image.new("LA", (2, 2), (77, 200)), ".tif"), "LA", _gray(77, 77)),
    "P_png": (_save(_palette(False), ".png"), "P", _rgb8(COLOUR, (250, 5, 100))),
    "P_transparent_png": (_save(_palette(True), ".png"), "P", _rgb8(COLOUR, (250, 5, 100))),
    "P_transparent_gif": (_save(_palette(True), ".gif"), "P", _rgb8(COLOUR, (250, 5, 100))),
    "RGB_png": (_save(Image.fromarray(rgba[..., :3].copy()), ".png"), "RGB", _rgb8(COLOUR, (250, 5, 100))),
    "RGBA_png": (_save(Image.fromarray(rgba, "RGBA"), ".png"), "RGBA", _rgb8(COLOUR, (250, 5, 100))),
    "RGBA_tif": (_save(Image.fromarray(rgba, "RGBA"), ".tif"), "RGBA", _rgb8(COLOUR, (250, 5, 100))),
    "CMYK_tif": (_save(Image.fromarray(rgba[..., :3].copy()).convert("CMYK"), ".tif"), "CMYK",
                 _rgb8(COLOUR, (250, 5, 100))),
    "YCbCr_tif": (_save(Image.new("YCbCr", (2, 2), (128, 128, 128)), ".tif"), "YCbCr", _gray(128, 128)),
    # 16-bit gray: v / 65535, rounded to the nearest 1/255 (150*257 + 128 -> 150, + 129 -> 151)
    "I16_png": (_raw16(_gray16([150 * 257, 65535, 150 * 257 + 128, 150 * 257 + 129])), "I;16",
                _gray(150, 255)),
    "I16_pillow_png": (_save(Image.fromarray(_gray16([150 * 257, 0, 0, 0])), ".png"), "I;16", _gray(150, 0)),
    "I16_tif": (_save(Image.fromarray(_gray16([150 * 257, 1 * 257, 0, 0])), ".tif"), "I;16", _gray(150, 1)),
    "I16B_tif": (_save(Image.frombytes("I;16B", (2, 2), _gray16([150 * 257, 65535, 0, 0]).astype(">u2")
                                       .tobytes()), ".tif"), "I;16B", _gray(150, 255)),
    "I_pgm16": (_pgm16([150 * 257, 65535, 0, 0]), "I", _gray(150, 255)),
    "I_tif": (_save(Image.fromarray(np.array([[150 * 257, 65535], [0, 0]], np.int32)), ".tif"), "I",
              _gray(150, 255)),
    "F_tif": (_save(Image.fromarray(np.array([[51 / 255, 1.0], [0.25, 0.0]], np.float32)), ".tif"), "F",
              _gray(51, 255)),
    # 16 bits per colour channel: Pillow keeps the high byte (0x12FF -> 0x12 = 18, within 1/255 of v/65535)
    "RGB48_png": (_raw16(rgb48), "RGB", _rgb8((150, 255, 0), (18, 7, 255))),
    "RGBA64_png": (_raw16(rgba64), "RGBA", _rgb8((150, 255, 0), (7, 255, 3))),
}


def _decode(path) -> torch.Tensor:
    img, label = RobustImageFolder([(str(path), 0)], ["a"], T.ToTensor())[0]
    assert label == 0 and img.dtype == torch.float32
    return img


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_decodes_to_rgb_with_the_same_brightness(tmp_path, case):
    write, mode, (p00, p01) = CASES[case]
    path = write(tmp_path / case)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really is of the mode under test
    x = _decode(path)
    assert x.shape == (3, 2, 2)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(p00), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[:, 0, 1], torch.tensor(p01), atol=1e-6, rtol=0)


def test_premultiplied_and_palette_alpha_modes_drop_alpha():
    """RGBa (TIFF with associated alpha) and PA, which Pillow reads but the tests cannot write."""
    from datamodules.image_folder import _to_rgb

    premultiplied = Image.new("RGBa", (1, 1), (50, 25, 10, 128))  # (100, 50, 20) at alpha 128/255
    assert _to_rgb(premultiplied).getpixel((0, 0)) == (99, 49, 19)  # un-premultiplied, alpha dropped
    pa = Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([0, 0, 0, *COLOUR])
    assert _to_rgb(pa).getpixel((0, 0)) == COLOUR  # fully transparent, colour kept


def test_sixteen_bit_and_float_values_keep_their_brightness(tmp_path):
    x = _decode(CASES["I16_png"][0](tmp_path / "g16"))
    assert (x[:, 1, 0] * 255).round().tolist() == [150] * 3 and (x[:, 1, 1] * 255).round().tolist() == [151] * 3
    f = _decode(CASES["F_tif"][0](tmp_path / "f"))
    assert abs(float(f[0, 1, 0]) - 0.25) <= 0.5 / 255 and float(f[0, 1, 1]) == 0.0  # 0.25 -> nearest 1/255
    hi = _decode(CASES["RGB48_png"][0](tmp_path / "rgb48"))
    assert abs(float(hi[0, 0, 1]) - 0x12FF / 65535) <= 1 / 255


def _float_tif(path, values):
    Image.fromarray(np.asarray(values, np.float32).reshape(2, 2)).save(path)
    return path


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("above_one", lambda p: _float_tif(p, [0.5, 1.5, 0.0, 0.0]), r"values in \[0, 1\.5\].*\[0, 1\]"),
        ("negative", lambda p: _float_tif(p, [-0.25, 0.5, 0.0, 0.0]), r"values in \[-0\.25, 0\.5\]"),
        ("nan", lambda p: _float_tif(p, [np.nan, 0.5, 0.0, 0.0]), r"1 non-finite value"),
        ("inf", lambda p: _float_tif(p, [np.inf, -np.inf, 0.0, 0.0]), r"2 non-finite value"),
        ("int32_above_16bit", lambda p: Image.fromarray(np.array([[70000, 0], [0, 0]], np.int32)).save(p),
         r"mode I\) with values in \[0, 70000\].*\[0, 65535\]"),
        ("int32_negative", lambda p: Image.new("I", (2, 2), -5).save(p), r"values in \[-5, -5\]"),
        ("LAB", lambda p: Image.new("LAB", (2, 2), (50, 10, 20)).save(p), r"image mode 'LAB' is not supported"),
    ],
)
def test_out_of_range_values_and_unknown_modes_are_refused_naming_the_file(tmp_path, name, write, message):
    path = tmp_path / f"{name}.tif"
    write(path)
    with pytest.raises(BadImageError, match=message) as info:
        _decode(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    skip = RobustImageFolder([(str(path), 0)], ["a"], T.ToTensor(), "skip")
    assert skip[0] is None and skip.num_skipped == 1


# ------------------------------------------------------------------------------ through a DataModule
def test_imagenet_subset_loader_decodes_modes_and_skips_out_of_range_floats(tmp_path):
    root = tmp_path / "inet"
    cases = ["I16_png", "F_tif", "RGBA_png", "P_transparent_gif", "CMYK_tif"]  # class i = cases[i]
    for split in ("train", "val"):
        for i, case in enumerate(cases):
            (root / split / f"c{i}").mkdir(parents=True)
            CASES[case][0](root / split / f"c{i}" / "0")
    bad = _float_tif(root / "val" / "c1" / "1.tif", [2.0, 0.0, 0.0, 0.0])
    dm = ImageNetSubsetDataModule(data_dir=str(root), image_size=2, augment=False, batch_size=8)
    dm.setup("fit")
    with pytest.raises(BadImageError, match=rf"{bad}.*values in \[0, 2\]"):
        next(iter(dm.val_dataloader()))
    dm = ImageNetSubsetDataModule(data_dir=str(root), image_size=2, augment=False, batch_size=8,
                                  bad_images="skip")
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert dm.val_dataset.num_skipped == 1 and sorted(y.tolist()) == [0, 1, 2, 3, 4]
    for img, label in zip(x, y.tolist()):
        p00, p01 = CASES[cases[label]][2]
        torch.testing.assert_close(img[:, 0, 0], torch.tensor(p00), atol=1e-6, rtol=0)
        torch.testing.assert_close(img[:, 0, 1], torch.tensor(p01), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ mixed image sizes
def _cifar_folder(root, odd=None, odd_size=(40, 32)):
    """One 32x32 PNG per class and split; ``odd = (split, class)`` gets ``odd_size`` (w, h) instead."""
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            (root / split / cls).mkdir(parents=True)
            w, h = odd_size if odd == (split, cls) else (32, 32)
            Image.fromarray(np.full((h, w, 3), 20 * label, np.uint8)).save(root / split / cls / "0.png")
    return root


@pytest.mark.parametrize("split, augment, bad_images", [("test", False, "error"), ("train", True, "skip")])
def test_cifar_folder_image_of_another_size_fails_naming_file_and_sizes(tmp_path, split, augment, bad_images):
    root = _cifar_folder(tmp_path / "cifar", odd=(split, "cat"))
    dm = CIFAR10DataModule(data_dir=str(root), val_fraction=0.0, augment=augment, bad_images=bad_images,
                           batch_size=16)
    dm.setup("fit")
    loader = dm.test_dataloader() if split == "test" else dm.train_dataloader()
    odd = root / split / "cat" / "0.png"
    with pytest.raises(ImageSizeError, match=rf"{odd} is 40x32 .* needs 32x32") as info:
        next(iter(loader))  # RandomCrop(32, padding=4) would have cut a 32x32 piece out of it
    assert (info.value.path, info.value.size, info.value.expected) == (str(odd), (40, 32), (32, 32))
    again = pickle.loads(pickle.dumps(info.value))  # as re-raised from a DataLoader worker
    assert (again.path, again.size, again.expected, str(again)) == (str(odd), (40, 32), (32, 32), str(info.value))


def test_cifar_folder_of_32px_images_loads(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(_cifar_folder(tmp_path / "cifar")), val_fraction=0.0, augment=True,
                           batch_size=16)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (10, 3, 32, 32)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and torch.equal((x[:, 0, 0, 0] * 255).round(), 20 * y.float())


@pytest.mark.parametrize("augment", [False, True])
def test_imagenet_subset_resizes_mixed_sizes(tmp_path, augment):
    root = tmp_path / "inet"
    sizes = [(20, 20), (30, 17), (9, 33), (8, 8)]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k, (w, h) in enumerate(sizes):
                Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / split / c / f"{k}.png")
    dm = ImageNetSubsetDataModule(data_dir=str(root), image_size=8, augment=augment, batch_size=16)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape == (8, 3, 8, 8)
        torch.testing.assert_close(x, torch.full_like(x, 90 / 255), atol=1e-6, rtol=0)
