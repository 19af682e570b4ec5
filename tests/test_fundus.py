"""Specification of cleaq_jax.data.fundus: disc detection, crop, retinal mask and image loading."""

import os

import cv2
import numpy as np
import pytest

from cleaq_jax.data import fundus
from cleaq_jax.data.fundus import BadImageError, Disc, NoDiscError
from fixtures_layouts import place, retina, retina_disc, truncate, write_gif_mask, write_image, write_oversized_png
from fixtures_layouts import write_unreadable


def assert_disc_close(found: Disc, truth: Disc, tol: float = 0.02) -> None:
    err = max(abs(found.cx - truth.cx), abs(found.cy - truth.cy), abs(found.r - truth.r))
    assert err <= tol * truth.r, f"found {found}, truth {truth}: off by {err / truth.r:.1%} of r"


def jpeg(image: np.ndarray, quality: int = 85) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def test_find_disc_on_the_real_photo_matches_its_measured_circle():
    assert_disc_close(fundus.find_disc(retina()), retina_disc())


@pytest.mark.parametrize("canvas, diameter, offset, gain", [
    ((1600, 1200), 1100, (250, 50), 1.0),     # EyePACS-like 4:3, centred-ish
    ((1600, 1200), 800, (700, 350), 1.0),     # small disc far off centre
    ((800, 600), 520, (40, 60), 0.35),        # dark (reject-like) photo
    ((1440, 960), 930, (255, 15), 0.8),       # Messidor 1440x960
    ((2304, 1536), 1480, (420, 28), 1.0),     # Messidor 2304x1536
])
def test_find_disc_on_noisy_black_canvases_within_two_percent_of_radius(canvas, diameter, offset, gain):
    image, truth = place(canvas, diameter, offset, gain=gain, noise=4.0)
    assert_disc_close(fundus.find_disc(jpeg(image)), truth)


@pytest.mark.parametrize("offset", [(100, -100), (100, -190), (200, -20)])
def test_find_disc_recovers_the_full_circle_of_a_disc_clipped_top_and_bottom(offset):
    # Canvas height well below the disc diameter: both the top and the bottom of the disc are cut off.
    image, truth = place((1600, 1000), 1200, offset)
    assert truth.cy - truth.r < 0 and truth.cy + truth.r > 1000
    assert_disc_close(fundus.find_disc(jpeg(image)), truth)


def test_find_disc_on_a_drive_sized_image():
    image, truth = place((565, 584), 546, (10, 19))
    assert_disc_close(fundus.find_disc(image), truth)


@pytest.mark.parametrize("fill", [0, 128, 255])
def test_uniform_image_raises_no_disc_naming_the_file(fill):
    with pytest.raises(NoDiscError, match="blank_01.jpeg"):
        fundus.find_disc(np.full((300, 400, 3), fill, np.uint8), name="blank_01.jpeg")


def test_photo_without_a_dark_border_raises_no_disc():
    # A crop from inside the field of view: bright everywhere, no circular outline to find.
    with pytest.raises(NoDiscError, match="inner_crop"):
        fundus.find_disc(np.ascontiguousarray(retina()[300:1100, 300:1100]), name="inner_crop")


def test_no_disc_error_is_a_value_error():
    assert issubclass(NoDiscError, ValueError) and issubclass(BadImageError, ValueError)


def test_preprocess_returns_square_uint8_image_and_binary_mask():
    image, _ = place((640, 480), 420, (100, 30))
    out, mask = fundus.preprocess(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}


def test_preprocess_centres_the_disc_and_masks_outside_it():
    image, _ = place((640, 480), 420, (100, 30))
    out, mask = fundus.preprocess(image, 128)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 63.5) < 2 and abs(ys.mean() - 63.5) < 2
    # The photo's notch removes a little of the circle; nothing outside the circle is kept.
    assert 0.95 * np.pi / 4 < mask.mean() <= np.pi / 4 + 0.01
    assert not out[mask == 0].any()
    assert (out[mask == 1].max(axis=1) > 0).mean() > 0.99


def test_preprocess_pads_a_clipped_disc_with_black_where_it_leaves_the_canvas():
    image, truth = place((1600, 1000), 1200, (100, -300))
    size = 128
    out, mask = fundus.preprocess(image, size)
    # The canvas' top edge lies this many output rows below the top of the disc's square.
    cut = (0 - (truth.cy - truth.r)) * size / (2 * truth.r)
    assert not out[: int(cut) - 1].any() and not mask[: int(cut) - 1].any()
    assert mask[int(cut) + 2 : size - int(cut) - 2, size // 2].all()


def test_preprocess_error_names_the_file():
    with pytest.raises(NoDiscError, match="eyepacs/123_left.jpeg"):
        fundus.preprocess(np.zeros((240, 320, 3), np.uint8), 64, name="eyepacs/123_left.jpeg")


def test_preprocess_rejects_an_array_that_is_not_rgb_uint8():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        fundus.preprocess(np.zeros((240, 320), np.float32), 64, name="x")


@pytest.mark.parametrize("ext, exact", [(".jpeg", False), (".png", True), (".tif", True), (".gif", False)])
def test_load_image_reads_each_published_format_as_rgb(tmp_path, ext, exact):
    image, _ = place((320, 240), 220, (50, 10))
    loaded = fundus.load_image(write_image(str(tmp_path / f"photo{ext}"), image))
    assert loaded.shape == image.shape and loaded.dtype == np.uint8
    error = np.abs(loaded.astype(int) - image).mean()
    assert error == 0 if exact else error < 12  # GIF quantises to 256 colours, JPEG is lossy
    assert loaded[..., 0].mean() > loaded[..., 2].mean()  # fundus red dominates: channels are RGB


@pytest.mark.parametrize("ext", [".jpeg", ".png", ".tif", ".gif"])
def test_load_image_rejects_a_truncated_file_naming_it(tmp_path, ext):
    path = truncate(write_image(str(tmp_path / f"cut{ext}"), place((320, 240), 220, (50, 10))[0]))
    with pytest.raises(BadImageError, match=f"cut{ext}.*truncated"):
        fundus.load_image(path)


def test_load_image_rejects_a_file_that_is_not_an_image(tmp_path):
    path = write_unreadable(str(tmp_path / "page.jpeg"))
    with pytest.raises(BadImageError, match="page.jpeg: not a JPEG"):
        fundus.load_image(path)


def test_load_image_rejects_a_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="absent.tif"):
        fundus.load_image(str(tmp_path / "absent.tif"))


@pytest.mark.parametrize("ext", [".jpeg", ".png", ".tif", ".gif"])
def test_image_dimensions_come_from_the_header(tmp_path, ext):
    path = write_image(str(tmp_path / f"photo{ext}"), place((320, 240), 220, (50, 10))[0])
    with open(path, "rb") as f:
        assert fundus.image_dimensions(f.read()) == (320, 240)
    assert fundus.image_dimensions(b"<html>") is None


def test_a_png_declaring_40000_px_is_refused_by_its_header_naming_the_limit(tmp_path):
    path = write_oversized_png(str(tmp_path / "bomb.png"))
    assert os.path.getsize(path) < 100_000
    with pytest.raises(BadImageError, match=r"bomb.png: the image declares 40000 x 40000 px, over the limit of "
                                            r"100,000,000 pixels \(cleaq_jax.data.fundus.MAX_IMAGE_PIXELS\)"):
        fundus.load_image(path)
    with pytest.raises(BadImageError, match="40000 x 40000"):
        fundus.load_mask(path)


def test_a_jpeg_whose_frame_header_declares_40000_px_is_refused(tmp_path):
    path = write_image(str(tmp_path / "big.jpeg"), place((320, 240), 220, (50, 10))[0])
    with open(path, "rb") as f:
        data = bytearray(f.read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (40000).to_bytes(2, "big") * 2  # height, width
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(BadImageError, match="declares 40000 x 40000 px"):
        fundus.load_image(path)


def test_opencvs_own_pixel_limit_is_reported_as_a_bad_image(tmp_path, monkeypatch):
    # Above our limit OpenCV's (2**30 pixels) still stands; its cv2.error must not escape.
    monkeypatch.setattr(fundus, "MAX_IMAGE_PIXELS", 2**40)
    path = write_oversized_png(str(tmp_path / "bomb.png"))
    with pytest.raises(BadImageError, match="bomb.png: OpenCV cannot decode the file"):
        fundus.load_image(path)


def test_load_mask_reads_a_palette_gif_as_zero_one(tmp_path):
    mask = np.zeros((584, 565), np.uint8)
    cv2.circle(mask, (282, 292), 250, 1, -1)
    loaded = fundus.load_mask(write_gif_mask(str(tmp_path / "21_training_mask.gif"), mask))
    np.testing.assert_array_equal(loaded, mask)


def test_crop_mask_keeps_one_pixel_vessels_when_shrinking():
    vessel = np.zeros((600, 600), np.uint8)
    vessel[:, 301] = 1  # one pixel wide, shrunk 8x below
    disc = Disc(299.5, 299.5, 300.0)
    assert fundus.crop_mask(vessel, disc, 75, keep_thin=True)[:, 37].all()
    assert not fundus.crop_mask(vessel, disc, 75).any()


def test_crop_to_disc_maps_the_disc_square_onto_the_output():
    array = np.zeros((100, 200), np.uint8)
    array[20:60, 50:90] = 255  # exactly the disc's square
    out = fundus.crop_to_disc(array, Disc(69.5, 39.5, 20.0), 40, cv2.INTER_NEAREST)
    assert out.all()


def test_find_disc_is_fast_on_a_full_size_eyepacs_canvas():
    import time

    image, truth = place((4752, 3168), 3000, (900, 84))
    start = time.perf_counter()
    disc = fundus.find_disc(image)
    # Detection works on a downscaled copy: well under a second even on a loaded 2-core machine.
    assert time.perf_counter() - start < 1.0
    assert_disc_close(disc, truth)
