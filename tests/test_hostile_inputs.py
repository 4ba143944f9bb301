"""Hostile input files end in one clear error, never a crash, a huge allocation or a silently
wrong answer: decompression bombs, PNGs that fail their CRC, lying .npy headers, non-finite
batches, file names that are not UTF-8 (docs/ARTIFACT.md, "Hostile inputs")."""

import os
import struct
import subprocess
import zlib

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch
from helpers import repmlp_infer_binary
from test_runtime_cli import assert_error, run_cli

# Only the image cases need the decoder; the .npy and artifact cases run on every build.
needs_stb = pytest.mark.skipif(not repmlp_rt.has_image_decoding(), reason="built without stb_image")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(path, width: int, height: int):
    """A valid-looking 200-byte PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    return path


def jpeg_bomb(source, path, width: int, height: int):
    """A real JPEG whose SOF0 segment claims another size."""
    data = bytearray(source.read_bytes())
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture()
def small_jpeg(tmp_path):
    from PIL import Image

    path = tmp_path / "small.jpg"
    Image.fromarray(helpers.random_images(1, 40, 48)[0]).save(path, quality=90)
    return path


@needs_stb
def test_decompression_bombs_are_refused_before_decoding(fake_artifact, tmp_path, small_jpeg):
    bomb = png_bomb(tmp_path / "bomb.png", 100_000, 100_000)
    jbomb = jpeg_bomb(small_jpeg, tmp_path / "bomb.jpg", 60_000, 60_000)
    message = "pixels, over the limit of 67108864"
    for path, claimed in ((bomb, "100000 x 100000"), (jbomb, "60000 x 60000")):
        assert_error(run_cli(fake_artifact, path), 1, f"claims {claimed} = ")
        assert_error(run_cli(fake_artifact, path), 1, message)
        with pytest.raises(repmlp_rt.InputError, match=message):
            repmlp_rt.decode_image(str(path))
    assert repmlp_rt.DEFAULT_MAX_IMAGE_PIXELS == 1 << 26


@needs_stb
def test_the_pixel_limit_is_settable(fake_artifact, tmp_path):
    image = helpers.save_png(tmp_path / "x.png", helpers.random_images(1, 21, 34)[0])  # 714 pixels
    assert_error(run_cli(fake_artifact, image, "--max-image-pixels", "700"), 1, "over the limit of 700")
    assert run_cli(fake_artifact, image, "--max-image-pixels", "714").returncode == 0
    assert run_cli(fake_artifact, image, "--max-image-pixels", "0").returncode == 0  # no limit of ours
    with pytest.raises(ValueError, match="over the limit of 700"):
        repmlp_rt.decode_image(str(image), max_pixels=700)
    assert repmlp_rt.decode_image(str(image), max_pixels=714).shape == (21, 34, 3)
    assert_error(run_cli(fake_artifact, image, "--max-image-pixels", "-1"), 2, "max-image-pixels")
    with pytest.raises(ValueError, match="max_pixels must be >= 0"):
        repmlp_rt.decode_image(str(image), max_pixels=-1)


@needs_stb
def test_a_png_failing_its_crc_is_refused(fake_artifact, tmp_path):
    good = helpers.save_png(tmp_path / "good.png", helpers.random_images(1, 16, 16)[0]).read_bytes()
    idat = good.index(b"IDAT")
    flipped = bytearray(good)
    flipped[idat + 20] ^= 0x04  # a bit inside the compressed pixels
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(flipped))
    assert_error(run_cli(fake_artifact, path), 1, "PNG chunk 'IDAT' at byte")
    with pytest.raises(ValueError, match="fails its CRC check"):
        repmlp_rt.decode_image(str(path))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good[: good.index(b"IEND") - 4])  # everything but the IEND chunk
    with pytest.raises(ValueError, match="truncated PNG"):
        repmlp_rt.decode_image(str(cut))


@needs_stb
def test_garbage_and_truncated_jpegs(fake_artifact, tmp_path, small_jpeg):
    data = small_jpeg.read_bytes()
    for name, content in (("garbage.jpg", os.urandom(300)), ("header.jpg", data[:100]), ("empty.jpg", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        assert_error(run_cli(fake_artifact, path), 1, "cannot decode image")


@needs_stb
def test_a_corrupt_jpeg_that_decodes_always_decodes_the_same(fake_artifact, tmp_path):
    # A JPEG from the fuzz suite (tests/fuzz.py, seed 0, case 138: 13 bytes overwritten at
    # offset 16) that stb_image still decodes while reading memory it never wrote: unless the
    # decoder's allocations are zeroed, each decode gives other pixels and the CLI other logits.
    path = os.path.join(os.path.dirname(__file__), "data", "corrupt_decodable.jpg")
    first = repmlp_rt.decode_image(path)
    for round_ in range(8):
        junk = [bytearray(os.urandom(1)) * (4096 + 512 * i) for i in range(32)]  # dirty the heap
        del junk
        np.testing.assert_array_equal(repmlp_rt.decode_image(path), first, err_msg=f"decode {round_ + 2}")
    runtime = repmlp_rt.Runtime(fake_artifact)
    expected = runtime.infer(first[None])
    for _ in range(2):
        out = tmp_path / "logits.npy"
        result = run_cli(fake_artifact, path, "--output", str(out))
        assert result.returncode == 0, result.stderr
        np.testing.assert_array_equal(np.load(out), expected)


def test_npy_header_claiming_a_huge_shape_allocates_nothing(fake_artifact, tmp_path):
    # (10^12, 3, 32, 32) floats would be 12 PB: refused from the header and the file size.
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 32, 32), }"
    header = header.ljust(118) + "\n"
    path = tmp_path / "huge.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64)
    assert_error(run_cli(fake_artifact, path), 1, "truncated: shape needs 12288000000000000 data bytes, file has 64")
    overflow = header.replace("1000000000000", "999999999999999")
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(overflow)) + overflow.encode())
    assert_error(run_cli(fake_artifact, path), 1, "cannot read .npy")


def test_non_finite_batches_are_refused(fake_artifact, tmp_path):
    x = np.zeros((2, 3, 32, 32), np.float32)
    x[1, 2, 3, 4] = np.nan
    x[0, 0, 0, 0] = np.inf
    assert_error(run_cli(fake_artifact, helpers.write_npy(tmp_path / "nan.npy", x)), 1,
                 "expected finite float32 values, got 2 NaN or infinite value(s)")


def test_non_utf8_names_and_upper_case_extensions(fake_artifact, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    name = os.fsencode(tmp_path) + b"/\xff\xfe\xe9t\xc9.NPY"
    np.save(open(name, "wb"), x)
    out = tmp_path / "logits.npy"
    result = subprocess.run([repmlp_infer_binary(), str(fake_artifact), name, "--output", str(out)],
                            capture_output=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr  # read as .npy although the name is not UTF-8
    assert result.stdout.startswith(name + b"[0]: ")
    reference = helpers.load_reference(fake_artifact)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(out), reference, rtol=1e-5, atol=1e-5)


def test_an_error_quoting_bytes_that_are_not_utf8_stays_one_line_of_text(fake_artifact, tmp_path):
    """The loader quotes the file's bytes in its message; Python and the CLI get them escaped
    (never a UnicodeDecodeError from the binding)."""
    path = helpers.write_non_utf8_version(fake_artifact, tmp_path / "version.pt")
    with pytest.raises(repmlp_rt.ArtifactError, match=r"version \\x[89a-f][0-9a-f]") as raised:
        repmlp_rt.Runtime(str(path))
    assert "\n" not in str(raised.value)
    assert_error(run_cli(path, "--info"), 1, "version \\x")
