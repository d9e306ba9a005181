"""Hostile and unusual images through the real app. Every bad one is a 4xx with a code; the valid
variants (CMYK, LA, 16-bit, palette, animated GIF) answer 200; the server keeps answering normal requests."""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support.images import jpeg_bytes, png_bytes
from tests.support.service_app import error_code, make_config, serve_in_thread

TASK = "demo"
URL = f"/v1/classify?task={TASK}&top_k=3"
QUICK_S = 2.0  # "quickly": a generous bound, far above the few ms these rejections take


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("images"), demo=True)
    with serve_in_thread(config, backbone) as s:
        yield s


def classify(served, data: bytes, content_type: str | None = "application/octet-stream"):
    headers = {"content-type": content_type} if content_type else {}
    started = time.perf_counter()
    r = served.post(URL, content=data, headers=headers)
    return r, time.perf_counter() - started


def assert_still_serving(served) -> None:
    r, _ = classify(served, png_bytes(), "image/png")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"]


# -- hand-made files ----------------------------------------------------------------------------------------
def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zeros: ~12 KB on the wire, 100 megapixels decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    arr = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 31 % 65536).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def palette_png(transparent: bool) -> bytes:
    img = Image.new("RGB", (48, 40), (10, 200, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 0} if transparent else {}))
    return buf.getvalue()


def gif_frames() -> list[Image.Image]:
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = []
    for i, c in enumerate(colors):
        img = Image.new("RGB", (48, 40), c)
        img.paste((255 - c[0], 128, i * 60), (8, 8, 30, 30))
        frames.append(img)
    return frames


def gif_bytes(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=len(frames) > 1, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def jpeg_zip_polyglot() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("payload.txt", "this JPEG is also a zip archive")
    return jpeg_bytes() + archive.getvalue()


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (1, 2, 3)).save(buf, "TIFF")
    return buf.getvalue()


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
    b'<rect width="40" height="40"/></svg>'
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


# -- rejected -----------------------------------------------------------------------------------------------
def test_zero_bytes(served):
    r, elapsed = classify(served, b"")
    assert r.status_code == 400 and error_code(r) == "empty_image"
    assert elapsed < QUICK_S
    assert_still_serving(served)


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_truncated(served, kind):
    data = jpeg_bytes((64, 64)) if kind == "jpeg" else png_bytes((64, 64))
    r, _ = classify(served, data[: len(data) // 2])
    assert r.status_code == 400 and error_code(r) == "corrupt_image", r.text
    assert_still_serving(served)


def test_png_declaring_100_megapixels_is_refused_before_decoding(served):
    data = bomb_png()
    assert len(data) < 16 * 1024  # a ~12 KB file...
    assert struct.unpack(">II", data[16:24]) == (10_000, 10_000)  # ...whose IHDR declares 100 megapixels
    assert len(zlib.decompress(data[41:-16])) == 10_000 * 1_251  # ...and whose IDAT really inflates to them
    r, elapsed = classify(served, data, "image/png")
    assert r.status_code == 413 and error_code(r) == "image_too_large", r.text
    # Decoding 100 MP would take seconds and hundreds of MB; refusing from the header takes milliseconds.
    assert elapsed < QUICK_S
    assert_still_serving(served)


@pytest.mark.parametrize("size", [(60_000, 1), (1, 60_000)])
def test_extreme_aspect_ratio(served, size):
    r, elapsed = classify(served, png_bytes(size, mode="L"), "image/png")
    assert r.status_code == 422 and error_code(r) == "bad_image_dimensions", r.text
    assert elapsed < QUICK_S
    assert_still_serving(served)


def test_jpeg_zip_polyglot(served):
    data = jpeg_zip_polyglot()
    assert zipfile.is_zipfile(io.BytesIO(data))  # really both
    Image.open(io.BytesIO(data)).load()  # Pillow alone would accept it
    r, _ = classify(served, data, "image/jpeg")
    assert r.status_code == 422 and error_code(r) == "polyglot_image", r.text
    assert_still_serving(served)


@pytest.mark.parametrize(
    ("name", "data", "own_type"),
    [("svg", SVG, "image/svg+xml"), ("pdf", PDF, "application/pdf"), ("tiff", tiff_bytes(), "image/tiff")],
)
def test_formats_outside_the_allow_list(served, name, data, own_type):
    # Sent honestly: the Content-Type alone is refused.
    r, _ = classify(served, data, own_type)
    assert r.status_code == 415 and error_code(r) == "unsupported_media_type", (name, r.text)
    # Sent as a generic/JPEG body: the bytes are sniffed and refused (Pillow could open TIFF; the allow-list stops it).
    for ctype in ("application/octet-stream", "image/jpeg"):
        r, _ = classify(served, data, ctype)
        assert r.status_code == 415 and error_code(r) == "unsupported_image", (name, ctype, r.text)
    assert_still_serving(served)


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "image/svg+xml", "video/mp4", "text/html"])
def test_wrong_content_type(served, ctype):
    r, _ = classify(served, png_bytes(), ctype)
    assert r.status_code == 415 and error_code(r) == "unsupported_media_type", r.text


def test_garbage_bytes(served):
    r, _ = classify(served, b"\x00\x01not an image at all" * 50)
    assert r.status_code == 415 and error_code(r) == "unsupported_image"


# -- accepted variants --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "make", "ctype"),
    [
        ("cmyk-jpeg", lambda: jpeg_bytes(mode="CMYK"), "image/jpeg"),
        ("greyscale-jpeg", lambda: jpeg_bytes(mode="L"), "image/jpeg"),
        ("la-png", lambda: png_bytes(mode="LA"), "image/png"),
        ("rgba-png", lambda: png_bytes(mode="RGBA"), "image/png"),
        ("1bit-png", lambda: png_bytes(mode="1"), "image/png"),
        ("16bit-png", sixteen_bit_png, "image/png"),
        ("palette-png", lambda: palette_png(transparent=False), "image/png"),
        ("palette-transparent-png", lambda: palette_png(transparent=True), "image/png"),
        ("no-content-type", png_bytes, None),
    ],
)
def test_valid_variants_are_served(served, name, make, ctype):
    r, _ = classify(served, make(), ctype)
    assert r.status_code == 200, (name, r.text)
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(np.isfinite(p["score"]) for p in preds)


def test_animated_gif_uses_the_first_frame(served):
    frames = gif_frames()
    animated = gif_bytes(frames)
    assert Image.open(io.BytesIO(animated)).n_frames == 3
    r, _ = classify(served, animated, "image/gif")
    assert r.status_code == 200, r.text
    first, _ = classify(served, gif_bytes(frames[:1]), "image/gif")
    last, _ = classify(served, gif_bytes(frames[2:]), "image/gif")
    assert first.status_code == last.status_code == 200
    assert r.json()["predictions"] == first.json()["predictions"]
    assert r.json()["predictions"] != last.json()["predictions"]  # the frames really classify differently


# -- responsiveness -----------------------------------------------------------------------------------------
def test_bad_images_do_not_hold_up_good_ones(served):
    bad = [bomb_png(), jpeg_zip_polyglot(), jpeg_bytes((64, 64))[:300], b"", tiff_bytes(), png_bytes((60_000, 1), "L")]
    calls = [("POST", URL, {"content": data, "headers": {"content-type": "application/octet-stream"}}) for data in bad]
    good = [("POST", URL, {"content": png_bytes(), "headers": {"content-type": "image/png"}})] * 4
    started = time.perf_counter()
    responses = served.gather(calls * 3 + good)
    elapsed = time.perf_counter() - started
    statuses = [r.status_code for r in responses]  # an exception here would fail the test: none is expected
    assert all(400 <= s < 500 for s in statuses[: len(calls) * 3]), statuses
    assert statuses[len(calls) * 3 :] == [200] * 4, statuses
    assert elapsed < 3 * QUICK_S
    assert served.get("/healthz").status_code == 200


def test_concurrent_decodes_leave_the_warning_filters_alone(served):
    # Decoding runs on many threads; the decoder must not swap the process-wide warning filters per call
    # (warnings.catch_warnings is not thread-safe: concurrent entries and exits restore stale lists).
    import warnings

    before = list(warnings.filters)
    headers = {"content-type": "image/png"}
    calls = [("POST", URL, {"content": png_bytes((40 + i % 7, 40)), "headers": headers}) for i in range(64)]
    responses = served.gather(calls)
    assert [r.status_code for r in responses] == [200] * 64
    assert warnings.filters == before


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_images_decode_on_the_bounded_pool_below_the_process_priority(served):
    pool = served.state.classifier.decode_pool
    assert len(pool.threads) == 2 * served.state.config.decode_threads >= 2
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []
    decode_all = pool.decoder.decode_all

    def recording(blobs):
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return decode_all(blobs)

    pool.decoder.decode_all = recording
    try:
        assert classify(served, png_bytes(), "image/png")[0].status_code == 200
    finally:
        pool.decoder.decode_all = decode_all
    assert len(seen) == 1
    name, niceness = seen[0]
    assert name.startswith("lpt-decode") and niceness == min(19, main + served.state.config.decode_niceness) > main


def test_a_refused_part_of_a_multi_image_request_is_named(served):
    files = [
        ("image", ("a.png", png_bytes())),
        ("image", ("b.txt", b"not an image")),
        ("image", ("c.png", png_bytes())),
    ]
    r = served.post(URL, files=files)
    assert r.status_code == 415 and error_code(r) == "unsupported_image", r.text
    error = r.json()["error"]
    assert error["field"] == "image[1]" and error["message"].startswith("image 2 of 3: not an image"), error
    r, _ = classify(served, b"not an image")  # a single image needs no index
    assert r.status_code == 415 and r.json()["error"]["field"] == "image", r.text
    assert_still_serving(served)
