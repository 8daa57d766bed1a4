"""Opening images: every unusable input is one clear VlmError; every odd mode becomes RGB."""

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlm.errors import VlmError
from vlm.image import load_image, to_rgb


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims enormous dimensions (a decompression bomb) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def crafted_dds() -> bytes:
    """Issue #10's file: a DDS with its pixel-format flags zeroed (saved as .png, it is opened by
    content; Pillow then raises NotImplementedError while decoding it)."""
    buf = io.BytesIO()
    Image.new("RGBA", (64, 48)).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = bytes(4)
    return bytes(data)


def test_sources_of_every_kind(tmp_path):
    img = Image.new("RGB", (5, 3), (10, 20, 30))
    path = tmp_path / "x.png"
    img.save(path)
    for src in (path, str(path), png_bytes(img), img, np.zeros((3, 5, 3), np.uint8)):
        assert load_image(src).size == (5, 3)
    assert load_image(np.ones((3, 5), np.float32)).mode == "L"  # floats in [0, 1] are scaled to 0..255
    assert np.asarray(load_image(np.ones((2, 2, 3), np.float32)))[0, 0, 0] == 255


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_text("hello, I am text"), "not an image"),
    (lambda p: p.write_bytes(png_bytes(Image.new("RGB", (64, 64)))[:60]), "cannot read image"),
    (lambda p: p.write_bytes(b""), "not an image"),
    (lambda p: p.write_bytes(huge_png_header(200_000, 200_000)), "too large"),
    (lambda p: p.write_bytes(crafted_dds()), "NotImplementedError"),  # any decoder exception: one VlmError
])
def test_bad_files(tmp_path, make, needle):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(VlmError, match=needle):
        load_image(path)


def test_huge_image_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("the image was decoded")

    (tmp_path / "huge.png").write_bytes(huge_png_header(14000, 14000))  # 196 MP: over our cap, under Pillow's
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(VlmError, match="too large"):
        load_image(tmp_path / "huge.png")


@pytest.mark.parametrize("bad", [None, 123, 4.5, object()])
def test_image_of_a_wrong_type(bad):
    with pytest.raises(VlmError, match="an image must be"):
        load_image(bad)


def test_lazily_opened_truncated_pil_image():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # opened, not decoded
    with pytest.raises(VlmError, match="cannot read image"):
        load_image(lazy)


def test_missing_and_bad_arrays(tmp_path):
    with pytest.raises(VlmError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(VlmError, match="image array"):
        load_image(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(VlmError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "1", "F"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (4, 4))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 4)
    assert to_rgb(img, background=(255, 255, 255)).mode == "RGB"


def test_alpha_composited_onto_the_background():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 0), (255, 0, 0, 255))
    out = np.asarray(to_rgb(img, background=(255, 255, 255)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_sixteen_bit_greyscale_keeps_its_range():
    img = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 127, 255]


def test_cli_reports_bad_images_for_a_vision_model(tiny_smolvlm, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    p = subprocess.run([sys.executable, "-m", "vlm", "generate", "-m", str(tiny_smolvlm), "-p", "What is it?",
                        "-i", str(notes)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == f"vlm: error: not an image file: {notes}"
