"""ControlNet preprocessors: values against closed forms and, where OpenCV is installed, against the
extension's own OpenCV calls (cv2.Canny, cv2.GaussianBlur, its content shuffle, its XDoG)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.control.preprocess import (
    ALIASES,
    PREPROCESSORS,
    ControlImage,
    ResizeMode,
    _hq_resize,
    _hysteresis,
    blur_gaussian,
    canny,
    canny_edges,
    gaussian_blur,
    gaussian_kernel,
    inpaint,
    invert,
    none,
    parse_resize_mode,
    preprocess,
    resize_area,
    resize_control,
    resize_inpaint_control,
    scribble_threshold,
    scribble_xdog,
    shuffle,
    softedge_sobel,
    threshold,
    tile_resample,
)
from sdstudio.errors import SdStudioError


def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _arr(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _shapes(h: int = 128, w: int = 160) -> np.ndarray:
    """Filled shapes of different colours on black: a disk, a rectangle, a diagonal band."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2] = (200, 80, 30)
    img[10 : h - 20, 8 : w // 3] = (30, 220, 90)
    img[np.abs((yy - xx) - 20) < 6] = (90, 90, 250)
    return img


def _smooth_noise(h: int, w: int, seed: int, cells: int = 8) -> np.ndarray:
    """Random colours on a coarse grid, enlarged bicubically: a photo-like image with soft edges."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // cells, w // cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Canny


def _canny_cases() -> list[tuple[np.ndarray, int, int]]:
    rng = np.random.default_rng(0)
    shapes = _shapes()
    noisy = np.clip(shapes + rng.normal(0, 20, shapes.shape), 0, 255).astype(np.uint8)
    gray = _smooth_noise(96, 128, seed=1)[:, :, 0]
    return [
        (shapes, 100, 200),  # the extension's defaults
        (noisy, 100, 200),
        (noisy, 50, 120),
        (_smooth_noise(160, 120, seed=2), 20, 60),
        (rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), 100, 200),  # pure noise: NMS ties everywhere
        (gray, 10, 40),  # one channel
    ]


def _edge_iou(ours: np.ndarray, ref: np.ndarray) -> float:
    """Agreement of edge pixels: |ours & ref| / |ours | ref| (1 when both are empty)."""
    union = (ours | ref).sum()
    return 1.0 if union == 0 else float((ours & ref).sum() / union)


def test_canny_matches_cv2_canny() -> None:
    cv2 = pytest.importorskip("cv2")
    for img, low, high in _canny_cases():
        ref = cv2.Canny(img, low, high) > 0
        ours = canny_edges(img, low, high)
        assert ref.sum() > 50, "a case without edges checks nothing"
        # Measured: 100.00 % of edge pixels (and of all pixels) agree on every case (OpenCV 5.1.0).
        assert _edge_iou(ours, ref) >= 0.98


def test_canny_parity_check_rejects_broken_variants() -> None:
    """The parity measure above fails the usual mistakes: blurring first, a grey image instead of
    cv2's per-pixel strongest channel, no hysteresis (strong edges only)."""
    cv2 = pytest.importorskip("cv2")
    broken = {
        "blur first": lambda im, lo, hi: canny_edges(gaussian_blur(im, 1.0), lo, hi),
        "grey": lambda im, lo, hi: canny_edges(np.asarray(Image.fromarray(im).convert("L")), lo, hi),
        "no hysteresis": lambda im, lo, hi: canny_edges(im, hi, hi),
    }
    for label, fn in broken.items():
        worst = min(
            _edge_iou(fn(img, lo, hi), cv2.Canny(img, lo, hi) > 0) for img, lo, hi in _canny_cases()[:4]
        )
        assert worst < 0.9, label


def test_canny_step_edge_lands_on_the_dark_side() -> None:
    """A vertical step 0 -> 255 between columns 31 and 32: the Sobel magnitude is 4 * 255 in both
    columns; NMS keeps the left one (strict '>' against the left neighbour, '>=' against the right)."""
    img = np.zeros((20, 64, 3), np.uint8)
    img[:, 32:] = 255
    out = _arr(canny(_img(img)))
    expected = np.zeros((20, 64), np.int64)
    expected[:, 31] = 255
    assert np.array_equal(out[:, :, 0], expected)
    assert np.array_equal(out[:, :, 0], out[:, :, 2])  # white on black, in all three channels


def test_canny_thresholds_are_strict() -> None:
    # A step of 50: Sobel magnitude 4 * 50 = 200 in the column left of it.
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 10:] = 50
    assert canny_edges(img, 100, 199)[:, 9].all() and canny_edges(img, 100, 199).sum() == 10
    assert canny_edges(img, 100, 200).sum() == 0  # nothing above 'high'
    assert canny_edges(img, 200, 200).sum() == 0
    # A strong step of 100 (magnitude 400) over a weak one of 50 (200) below it: the weak rows join
    # through hysteresis above 'low' 199, not at 'low' 200 (cv2.Canny gives the same columns).
    img[:5, 10:] = 100
    assert canny_edges(img, 199, 300)[:, 9].tolist() == [True] * 4 + [False] * 2 + [True] * 4
    assert canny_edges(img, 200, 300)[:, 9].tolist() == [True] * 4 + [False] * 6


def test_hysteresis_keeps_8_connected_weak_chains_with_a_strong_pixel() -> None:
    candidate = np.zeros((8, 12), bool)
    strong = np.zeros((8, 12), bool)
    candidate[1, 1:6] = True  # a weak run ...
    candidate[2, 6] = candidate[3, 7] = True  # ... going on diagonally (8-connected) ...
    strong[1, 1] = True  # ... with one strong pixel
    candidate[6, 2:10] = True  # an isolated weak run
    candidate[4, 9] = True  # two apart from the first chain: not connected
    out = _hysteresis(candidate, strong)
    expected = np.zeros((8, 12), bool)
    expected[1, 1:6] = expected[2, 6] = expected[3, 7] = True
    assert np.array_equal(out, expected)
    strong[6, 9] = True
    assert _hysteresis(candidate, strong)[6, 2:10].all()


# --------------------------------------------------------------------------------------------------
# Invert, threshold, scribble


def test_invert_is_exact() -> None:
    arr = np.random.default_rng(3).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(_arr(invert(_img(arr))), 255 - arr.astype(np.int64))


def test_threshold_is_the_extensions_min_channel_rule() -> None:
    arr = np.array(
        [[[128, 200, 255], [127, 255, 255], [0, 0, 0], [255, 255, 255], [130, 129, 128]]], np.uint8
    )
    out = _arr(threshold(_img(arr)))[0, :, 0]
    assert out.tolist() == [255, 0, 0, 255, 255]  # white where min(R, G, B) > 127
    assert _arr(threshold(_img(arr), threshold=128))[0, :, 0].tolist() == [0, 0, 0, 255, 0]


def test_scribble_threshold_marks_dark_lines_and_equals_invert_then_threshold() -> None:
    arr = np.array([[[126, 0, 0], [127, 0, 0], [0, 0, 0], [255, 255, 255], [100, 120, 126]]], np.uint8)
    assert _arr(scribble_threshold(_img(arr)))[0, :, 0].tolist() == [255, 0, 255, 0, 255]
    rand = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for t in (0, 1, 64, 127, 200, 255):
        assert np.array_equal(
            _arr(scribble_threshold(_img(rand), t)), _arr(threshold(invert(_img(rand)), 255 - t))
        )


def _xdog_reference(cv2, img: np.ndarray, thr: int) -> tuple[np.ndarray, np.ndarray]:
    """The extension's scribble_xdog (scripts/preprocessor/model_free_preprocessors.py) with its uint8
    product, and the darkness 255 - dog it compares."""
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > thr] = 255
    return result, (255 - dog).astype(np.int64)


def test_scribble_xdog_matches_the_extension_but_for_its_uint8_wraparound() -> None:
    cv2 = pytest.importorskip("cv2")
    drawing = np.full((120, 160, 3), 255, np.uint8)
    drawing[30:33, 10:150] = 0  # a black line
    drawing[60:90, 40:42] = 90  # a grey line
    drawing[100:110, 100:140] = 150  # a light blob
    for img in (drawing, _smooth_noise(96, 128, seed=5)):
        # Not 1: 2 * d > 1 then turns on wherever float rounding leaves g2 - g1 a hair above 0.
        for thr in (2, 32, 64):
            ref, darkness = _xdog_reference(cv2, img, thr)
            ours = _arr(scribble_xdog(_img(img), thr))
            differ = (ours != ref).any(axis=2)
            # Differences only where the extension's 2 * d wrapped (d in 128..143) or on float ties.
            wrapped = (darkness >= 128) & (darkness < 144)
            assert (differ & ~wrapped).mean() < 0.001
            assert ours[~wrapped].max() == 255 or ref.max() == 0
    line = _arr(scribble_xdog(_img(drawing)))
    assert line[31, 80, 0] == 255 and line[5, 5, 0] == 0  # the line's middle white, paper black


# --------------------------------------------------------------------------------------------------
# Blur, tile


def test_gaussian_kernel_is_cv2s_formula() -> None:
    k = gaussian_kernel(1.5, 7)
    x = np.arange(7) - 3
    expected = np.exp(-(x**2) / (2 * 1.5**2))
    assert np.allclose(k, expected / expected.sum(), atol=1e-15)
    assert np.allclose(k, k[::-1]) and abs(k.sum() - 1) < 1e-12


def test_gaussian_blur_impulse_response_and_flat_image() -> None:
    sigma = 2.0
    impulse = np.zeros((41, 41), np.float32)
    impulse[20, 20] = 1.0
    ksize = 17  # round(2 * 4 * 2 + 1) | 1 taps for float images
    k = gaussian_kernel(sigma, ksize)
    expected = np.zeros((41, 41))
    expected[12:29, 12:29] = np.outer(k, k)
    assert np.allclose(gaussian_blur(impulse, sigma), expected, atol=1e-7)
    flat = np.full((30, 20, 3), 77, np.uint8)
    assert np.array_equal(gaussian_blur(flat, 9.0), flat)  # reflected borders keep a flat image flat


def test_blur_gaussian_matches_cv2_within_one_level() -> None:
    cv2 = pytest.importorskip("cv2")
    img = _smooth_noise(100, 150, seed=6, cells=4)
    for sigma in (0.01, 0.5, 3.3, 9.0, 40.0):
        ref = cv2.GaussianBlur(img, (0, 0), sigma).astype(np.int64)
        ours = _arr(blur_gaussian(_img(img), sigma))
        diff = np.abs(ours - ref)
        assert diff.max() <= 1, sigma  # cv2 rounds in fixed point for uint8 images
        assert (diff == 0).mean() > 0.85, sigma  # measured 90 .. 100 %


def test_tile_resample_sizes_and_values() -> None:
    img = _smooth_noise(100, 70, seed=7, cells=5)
    # The extension's small image: int(H / rate) x int(W / rate), area-averaged ...
    small = resize_area(img, int(70 / 3), int(100 / 3))
    assert small.shape == (33, 23, 3)
    out = tile_resample(_img(img), 3.0)
    assert out.size == (70, 100)
    # ... brought back up bicubically.
    back = Image.fromarray(small).resize((70, 100), Image.Resampling.BICUBIC)
    assert np.array_equal(_arr(out), np.asarray(back).astype(np.int64))


def test_resize_area_matches_cv2_inter_area() -> None:
    cv2 = pytest.importorskip("cv2")
    img = _smooth_noise(100, 70, seed=7, cells=5)
    for w, h in ((23, 33), (35, 50), (10, 7), (69, 99)):
        ref = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.int64)
        assert np.abs(resize_area(img, w, h).astype(np.int64) - ref).max() <= 1, (w, h)


def test_resize_area_is_the_overlap_weighted_mean() -> None:
    arr = np.arange(5, dtype=np.uint8)[None, :].repeat(2, axis=0) * 50  # columns 0, 50, 100, 150, 200
    out = resize_area(arr, 2, 1)
    # Output column 0 covers input [0, 2.5): (0 + 50 + 0.5 * 100) / 2.5 = 40; column 1: 160.
    assert out.tolist() == [[40, 160]]


def test_tile_resample_removes_detail_finer_than_the_rate() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    checker = (((yy + xx) % 2) * 255).astype(np.uint8)
    img = np.repeat(checker[:, :, None], 3, axis=2)
    out = _arr(tile_resample(_img(img), 2.0))
    assert np.abs(out - 127.5).max() <= 1  # every 2 x 2 block averages to 127.5
    assert np.array_equal(_arr(tile_resample(_img(img), 1.05)), img)  # below 1.1: unchanged


# --------------------------------------------------------------------------------------------------
# Soft edge, shuffle, none


def test_softedge_sobel_values() -> None:
    flat = np.full((16, 16, 3), 90, np.uint8)
    assert _arr(softedge_sobel(_img(flat))).max() == 0
    step = np.zeros((16, 32, 3), np.uint8)
    step[:, 16:] = 200
    out = _arr(softedge_sobel(_img(step), sigma=0))[:, :, 0]
    # Unblurred: magnitude 4 * 200 in columns 15 and 16 only, scaled to 255.
    assert (out[:, 15] == 255).all() and (out[:, 16] == 255).all()
    assert out[:, :15].max() == 0 and out[:, 17:].max() == 0
    faint = step // 20  # a step of 10: magnitude 40, still scaled to 255
    assert _arr(softedge_sobel(_img(faint), sigma=0))[:, 15:17].min() == 255
    soft = _arr(softedge_sobel(_img(step), sigma=2.0))[:, :, 0]
    assert soft.max() == 255 and 0 < soft[8, 13] < 255  # the blur spreads a graded edge
    assert np.array_equal(soft[:, :16], soft[:, 16:][:, ::-1])  # symmetric about the step


def _shuffle_reference(cv2, img: np.ndarray, seed: int) -> np.ndarray:
    """The extension's content shuffle (annotator/shuffle, annotator/util.make_noise_disk) after A1111's
    np.random.seed."""

    def make_noise_disk(h: int, w: int, f: int) -> np.ndarray:
        noise = np.random.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
        noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
        noise = noise[f : f + h, f : f + w]
        noise -= np.min(noise)
        noise /= np.max(noise)
        return noise[:, :, None]

    np.random.seed(seed)
    h, w, _ = img.shape
    x = make_noise_disk(h, w, 256) * float(w - 1)
    y = make_noise_disk(h, w, 256) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def test_shuffle_matches_the_extension_at_its_resolution() -> None:
    cv2 = pytest.importorskip("cv2")
    state = np.random.get_state()
    try:
        img = _smooth_noise(512, 640, seed=8, cells=16)
        for seed in (0, 1234):
            ref = _shuffle_reference(cv2, img, seed).astype(np.int64)
            diff = np.abs(_arr(shuffle(_img(img), seed)) - ref)
            assert diff.max() <= 1 and diff.mean() < 0.1, seed  # measured: max 1, mean 0.02 .. 0.07
    finally:
        np.random.set_state(state)


def test_shuffle_is_seeded_and_smooth() -> None:
    yy, xx = np.mgrid[0:96, 0:128]
    ramp = np.stack([xx * 2, yy * 2, (xx + yy)], axis=2).astype(np.uint8)
    a = _arr(shuffle(_img(ramp), seed=5))
    assert np.array_equal(a, _arr(shuffle(_img(ramp), seed=5)))
    b = _arr(shuffle(_img(ramp), seed=6))
    assert np.abs(a - b).mean() > 10
    assert not np.array_equal(a, ramp.astype(np.int64))
    # A smooth warp of a smooth ramp stays smooth: neighbours differ by a few levels, not by jumps.
    assert np.abs(np.diff(a, axis=1)).mean() < 4 and np.abs(np.diff(a, axis=0)).mean() < 4
    # Every output pixel is sampled from inside the image: red (= 2x) and green (= 2y) stay in range.
    assert a[:, :, 0].max() <= 254 and a[:, :, 1].max() <= 190


def test_none_returns_the_image_and_composites_transparency_over_white() -> None:
    arr = np.random.default_rng(9).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(_arr(none(_img(arr))), arr)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (10, 20, 30, 0)
    out = _arr(none(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]


# --------------------------------------------------------------------------------------------------
# Inpaint


def test_inpaint_hint_is_the_controlnet_inpaint_protocol() -> None:
    arr = np.random.default_rng(10).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 255
    mask[0, 0] = 127  # not masked: the extension binarises at > 127
    mask[0, 1] = 128
    result = inpaint(_img(arr), Image.fromarray(mask, "L"))
    masked = mask > 127
    assert result.hint.dtype == np.float32 and result.hint.shape == (8, 10, 3)
    assert (result.hint[masked] == -1.0).all()
    assert np.array_equal(result.hint[~masked], arr[~masked].astype(np.float32) / 255.0)
    assert np.array_equal(result.mask, masked)
    # Preview: masked pixels at the extension's alpha 255 - 255 // 2 = 128, over white.
    prev = np.asarray(result.image).astype(np.float64)
    expected = arr * (128 / 255) + 255 * (127 / 255)
    assert np.abs(prev[masked] - expected[masked]).max() <= 1
    assert np.array_equal(prev[~masked], arr[~masked])


def test_inpaint_through_the_registry_needs_a_matching_mask() -> None:
    img = _img(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SdStudioError, match="needs a mask"):
        preprocess("inpaint", img)
    with pytest.raises(SdStudioError, match="mask is 4x4 but the image is 8x8"):
        preprocess("inpaint_only", img, mask=np.ones((4, 4), bool))
    with pytest.raises(SdStudioError, match="takes no mask"):
        preprocess("canny", img, mask=np.ones((8, 8), bool))
    out = preprocess("inpaint_global_harmonious", img, mask=np.eye(8, dtype=bool))
    assert out.mask is not None and np.array_equal(out.mask, np.eye(8, dtype=bool))
    assert (np.diag(out.hint[:, :, 0]) == -1).all() and out.hint[0, 1, 0] == 0


# --------------------------------------------------------------------------------------------------
# Registry and validation


def test_registry_uses_the_extensions_names() -> None:
    for name in (
        "none",
        "canny",
        "invert",
        "threshold",
        "scribble_xdog",
        "shuffle",
        "tile_resample",
        "blur_gaussian",
        "inpaint",
        "inpaint_only",
    ):
        assert PREPROCESSORS[name].name == name
    assert PREPROCESSORS["invert"].label == "invert (from white bg & black line)"
    assert ALIASES["inpaint_global_harmonious"] == "inpaint"
    assert PREPROCESSORS["softedge_sobel"].needs_weights_in_extension
    assert [p.name for p in PREPROCESSORS["canny"].params] == ["low_threshold", "high_threshold"]
    assert [p.default for p in PREPROCESSORS["canny"].params] == [100, 200]
    assert PREPROCESSORS["blur_gaussian"].params[0].default == 9.0
    assert PREPROCESSORS["tile_resample"].params[0].default == 1.0
    assert PREPROCESSORS["threshold"].params[0].default == 127


@pytest.mark.parametrize("name", sorted(set(PREPROCESSORS) | set(ALIASES)))
def test_every_preprocessor_gives_a_same_size_rgb_image_and_its_hint(name: str) -> None:
    arr = _shapes(40, 56)
    kwargs = {"mask": np.eye(40, 56, dtype=bool)} if PREPROCESSORS[ALIASES.get(name, name)].needs_mask else {}
    out = preprocess(name, _img(arr), **kwargs)
    assert isinstance(out, ControlImage)
    assert out.image.mode == "RGB" and out.image.size == (56, 40)
    assert out.hint.shape == (40, 56, 3) and out.hint.dtype == np.float32
    if out.mask is None:
        assert np.array_equal(out.hint, np.asarray(out.image, np.float32) / 255.0)
    else:
        assert out.hint.min() == -1.0 and out.hint.max() <= 1.0


def test_preprocess_passes_parameters() -> None:
    img = _img(_shapes())
    assert np.array_equal(
        np.asarray(preprocess("canny", img, low_threshold=50, high_threshold=120).image),
        np.asarray(canny(img, 50, 120)),
    )
    assert np.array_equal(
        np.asarray(preprocess("scribble", img, threshold=40).image), np.asarray(scribble_threshold(img, 40))
    )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("canny", {"low_threshold": 300}, r"low_threshold must be in 0\.\.255, got 300"),
        ("canny", {"high_threshold": -1}, r"high_threshold must be in 0\.\.255, got -1"),
        ("canny", {"low_threshold": 200, "high_threshold": 100}, r"low_threshold \(200\) must not exceed"),
        ("canny", {"low_threshold": 10.5}, r"low_threshold must be an integer in 0\.\.255, got 10\.5"),
        ("canny", {"low_threshold": True}, r"low_threshold must be an integer"),
        ("canny", {"sigma": 1.0}, r"canny: unknown parameter 'sigma'; it takes low_threshold"),
        ("threshold", {"threshold": 256}, r"threshold must be in 0\.\.255"),
        ("blur_gaussian", {"sigma": 0}, r"sigma must be in 0\.01\.\.64, got 0"),
        ("blur_gaussian", {"sigma": -2.0}, r"sigma must be in 0\.01\.\.64"),
        ("blur_gaussian", {"sigma": float("nan")}, r"sigma must be a number"),
        ("tile_resample", {"down_sampling_rate": 0.5}, r"down_sampling_rate must be in 1\.\.8"),
        ("scribble_xdog", {"threshold": 0}, r"threshold must be in 1\.\.64"),
        ("shuffle", {"seed": -1}, r"seed must be in 0\.\.4294967295"),
    ],
)
def test_bad_parameters_name_the_parameter_and_its_range(name: str, params: dict, message: str) -> None:
    with pytest.raises(SdStudioError, match=message):
        preprocess(name, _img(np.zeros((8, 8, 3), np.uint8)), **params)


def test_names_are_found_in_any_case() -> None:
    img = _img(_shapes())
    assert np.array_equal(np.asarray(preprocess("Canny", img).image), np.asarray(canny(img)))
    assert np.array_equal(np.asarray(preprocess(" TILE ", img).image), np.asarray(tile_resample(img)))


def test_unknown_preprocessor_lists_the_known_ones() -> None:
    with pytest.raises(
        SdStudioError, match=r"unknown ControlNet preprocessor 'depth_midas'; known: none, canny, invert"
    ):
        preprocess("depth_midas", _img(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(SdStudioError, match=r"unknown ControlNet preprocessor None"):
        preprocess(None, _img(np.zeros((4, 4, 3), np.uint8)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Resize modes


def _bands() -> np.ndarray:
    """200 x 100: red columns 0..49, green 50..149, blue 150..199, inside a 4-pixel grey frame."""
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :50] = (255, 0, 0)
    img[:, 50:150] = (0, 255, 0)
    img[:, 150:] = (0, 0, 255)
    img[:4], img[-4:], img[:, :4], img[:, -4:] = 90, 90, 90, 90
    return img


def test_just_resize_stretches() -> None:
    out = _arr(resize_control(_img(_bands()), 40, 80, "Just Resize"))
    assert out.shape == (80, 40, 3)
    assert out[40, 5].tolist() == [255, 0, 0] and out[40, 20].tolist() == [0, 255, 0]


def test_shrinking_averages_areas() -> None:
    # Red 0, 50, 100, 150, 200 across five columns; 60 greens down the rows (over 200 colours, so a
    # photo: area averaging). Two columns cover [0, 2.5) and [2.5, 5): red 40 and 160.
    img = np.zeros((60, 5, 3), np.uint8)
    img[:, :, 0] = np.arange(5) * 50
    img[:, :, 1] = (np.arange(60) * 4)[:, None]
    out = _arr(resize_control(_img(img), 2, 60, "Just Resize"))
    assert (out[:, :, 0] == [40, 160]).all()
    assert (out[:, :, 1] == (np.arange(60) * 4)[:, None]).all()


def test_crop_and_resize_covers_then_crops_the_middle() -> None:
    # k = max(64 / 100, 64 / 200) = 0.64 -> 128 x 64, cropped from x = 32: the source's columns 50..150.
    out = _arr(resize_control(_img(_bands()), 64, 64))  # the default mode
    assert out.shape == (64, 64, 3)
    assert out[32, 4].tolist() == [0, 255, 0] and out[32, 59].tolist() == [0, 255, 0]
    assert (out[8:56, 8:56] == [0, 255, 0]).all()


def test_resize_and_fill_fits_inside_on_the_median_border_colour() -> None:
    # k = min(0.64, 0.32) = 0.32 -> 64 x 32, centred at y = 16 on the frame's grey.
    out = _arr(resize_control(_img(_bands()), 64, 64, ResizeMode.RESIZE_AND_FILL))
    assert out.shape == (64, 64, 3)
    assert (out[:16] == 90).all() and (out[48:] == 90).all()
    assert out[32, 10].tolist() == [255, 0, 0] and out[32, 32].tolist() == [0, 255, 0]
    assert out[32, 54].tolist() == [0, 0, 255]
    tall = _arr(resize_control(_img(_bands()), 100, 400, "resize and fill"))  # 100 x 50 at y = 175
    assert tall.shape == (400, 100, 3) and (tall[:175] == 90).all() and (tall[225:] == 90).all()


def test_resize_keeps_binary_maps_binary_and_segmentation_colours() -> None:
    edges = canny(_img(_shapes()))
    up = _arr(resize_control(edges, 320, 256, "Just Resize"))
    assert set(np.unique(up).tolist()) <= {0, 255} and up.max() == 255
    seg = np.zeros((40, 40, 3), np.uint8)
    colours = [(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (120, 120, 0)]
    for i, c in enumerate(colours):
        seg[i * 8 : (i + 1) * 8] = c
    out, _ = _hq_resize(seg, (57, 91), None)
    found = {tuple(c) for c in out.reshape(-1, 3).tolist()}
    assert found == set(colours)  # nearest: no blended colours


def test_resize_inpaint_control_masks_the_fill() -> None:
    img = _img(_bands())
    mask = np.zeros((100, 200), bool)
    mask[40:60, 90:110] = True
    image, out_mask = resize_inpaint_control(img, mask, 64, 64, "Resize and Fill")
    m = np.asarray(out_mask)
    assert image.size == (64, 64) and out_mask.mode == "L"
    assert set(np.unique(m).tolist()) == {0, 255}
    assert (m[:16] == 255).all() and (m[48:] == 255).all()  # the added border is repainted
    assert m[32, 32] == 255 and m[20, 10] == 0  # the mask follows the image
    _, cropped = resize_inpaint_control(img, mask, 64, 64)
    assert np.asarray(cropped)[32, 32] == 255 and np.asarray(cropped)[2, 2] == 0


def test_parse_resize_mode() -> None:
    assert parse_resize_mode(0) is ResizeMode.JUST_RESIZE
    assert parse_resize_mode(2) is ResizeMode.RESIZE_AND_FILL
    assert parse_resize_mode("crop and resize") is ResizeMode.CROP_AND_RESIZE
    assert parse_resize_mode("Inner Fit (Scale to Fit)") is ResizeMode.CROP_AND_RESIZE
    assert parse_resize_mode("Envelope (Outer Fit)") is ResizeMode.RESIZE_AND_FILL
    with pytest.raises(
        SdStudioError, match="unknown control resize mode 'stretch'; use one of 'Just Resize'"
    ):
        parse_resize_mode("stretch")
    with pytest.raises(SdStudioError, match="width must be a positive integer"):
        resize_control(_img(_bands()), 0, 10)
