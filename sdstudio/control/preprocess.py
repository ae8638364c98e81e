"""ControlNet preprocessors that need no downloaded weights, as AUTOMATIC1111's sd-webui-controlnet
extension (Mikubill/sd-webui-controlnet, ``scripts/preprocessor/``, ``annotator/``) defines them, in
numpy and Pillow only (the extension calls OpenCV; the tests compare against it where it is installed).

Each preprocessor maps an RGB PIL image to an RGB control image of the same size. :func:`preprocess`
looks one up by the extension's name (or label, or one of our aliases), checks its parameters and
returns a :class:`ControlImage`: the image a UI shows and the float hint array ControlNet's hint
input takes. :func:`resize_control` fits a control image to the generation size with the extension's
three resize modes.

What differs from the extension, on purpose:

- The extension first resizes the input to its "Preprocessor Resolution" (short side 512 by default);
  here a preprocessor works at the size it is given (resize first with :func:`resize_control` or
  Pillow where that matters: Canny's edges depend on scale).
- ``scribble_xdog`` compares ``2 * d > threshold`` in integers, where the extension's uint8 product
  wraps around for local darkness ``d`` in 128..143 and drops those pixels.
- :func:`resize_control` binarises two-colour maps with Otsu as the extension does, but leaves out
  its non-maximum suppression and thinning of one-pixel edges after an upscale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image

from sdstudio.errors import SdStudioError

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "PREPROCESSORS",
    "ControlImage",
    "Param",
    "Preprocessor",
    "ResizeMode",
    "blur_gaussian",
    "canny",
    "canny_edges",
    "control_hint",
    "gaussian_blur",
    "gaussian_kernel",
    "inpaint",
    "invert",
    "none",
    "parse_resize_mode",
    "preprocess",
    "resize_area",
    "resize_control",
    "resize_inpaint_control",
    "scribble_threshold",
    "scribble_xdog",
    "shuffle",
    "softedge_sobel",
    "threshold",
    "tile_resample",
]


# ---------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a preprocessor: its range is the extension's slider range where the
    extension has one."""

    name: str
    default: float
    minimum: float
    maximum: float
    integer: bool = False
    help: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{self.name} ({kind} in {_num(self.minimum)}..{_num(self.maximum)}, default {_num(self.default)})"

    def check(self, value: object, owner: str) -> float:
        """``value`` as an int or float inside the range, or :class:`SdStudioError` naming the range."""
        kind = "an integer" if self.integer else "a number"
        ok_type = (
            isinstance(value, (int, np.integer))
            if self.integer
            else isinstance(value, (int, float, np.number))
        )
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and math.isnan(value)):
            raise SdStudioError(
                f"{owner}: {self.name} must be {kind} in {_num(self.minimum)}..{_num(self.maximum)}, got {value!r}"
            )
        if not self.minimum <= value <= self.maximum:
            raise SdStudioError(
                f"{owner}: {self.name} must be in {_num(self.minimum)}..{_num(self.maximum)}, got {_num(value)}"
            )
        return int(value) if self.integer else float(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{float(x):g}"


# The extension's sliders (scripts/preprocessor/legacy/preprocessor_compiled.py, model_free_preprocessors.py);
# Canny's sliders start at 1, but cv2.Canny takes 0 as well, so 0 is allowed.
CANNY_LOW = Param("low_threshold", 100, 0, 255, integer=True, help="weak edges: gradient (L1) above this")
CANNY_HIGH = Param("high_threshold", 200, 0, 255, integer=True, help="strong edges: gradient (L1) above this")
THRESHOLD = Param("threshold", 127, 0, 255, integer=True, help="binarisation threshold (0..255)")
XDOG_THRESHOLD = Param("threshold", 32, 1, 64, integer=True, help="XDoG threshold")
BLUR_SIGMA = Param("sigma", 9.0, 0.01, 64.0, help="Gaussian sigma in pixels")
DOWN_SAMPLING_RATE = Param("down_sampling_rate", 1.0, 1.0, 8.0, help="downsample by this, then back up")
SOBEL_SIGMA = Param("sigma", 1.0, 0.0, 64.0, help="Gaussian pre-blur in pixels (0: none)")
SEED = Param("seed", 0, 0, 2**32 - 1, integer=True, help="numpy seed of the flow field")


# ---------------------------------------------------------------------------------------------------
# Array helpers


def _rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8. Transparency is composited over white, as the extension's ``HWC3`` does."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        x = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = x[..., 3:4] / 255.0
        return (x[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_image(arr: np.ndarray) -> Image.Image:
    """[H, W] or [H, W, 3] uint8 -> RGB PIL image."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel of [H, W, ...] with replicated borders (cv2.Sobel with BORDER_REPLICATE); ints stay ints.

    dx = right - left columns with weights (1, 2, 1); dy = lower - upper rows."""
    p = np.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    vert = p[:-2] + 2 * p[1:-1] + p[2:]  # [H, W + 2, ...]
    horiz = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [H + 2, W, ...]
    return vert[:, 2:] - vert[:, :-2], horiz[2:] - horiz[:-2]


def gaussian_kernel(sigma: float, ksize: int) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma): exp(-x^2 / (2 sigma^2)) at x = i - (ksize - 1) / 2, sum 1."""
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(x**2) / (2.0 * sigma * sigma))
    return k / k.sum()


def _correlate_axis0(p: np.ndarray, kernel: np.ndarray, n: int) -> np.ndarray:
    """``out[i] = sum_k kernel[k] * p[i + k]`` for i < n, along axis 0: direct for short kernels, by FFT
    for long ones (sigma 64 means 385 taps)."""
    if len(kernel) <= 41:
        out = np.zeros((n, *p.shape[1:]), np.float64)
        for k, w in enumerate(kernel):
            out += w * p[k : k + n]
        return out
    size = p.shape[0] + len(kernel) - 1
    nfft = 1 << (size - 1).bit_length()
    spectrum = np.fft.rfft(p, nfft, axis=0)
    kspec = np.fft.rfft(kernel[::-1], nfft).reshape(-1, *([1] * (p.ndim - 1)))
    full = np.fft.irfft(spectrum * kspec, nfft, axis=0)
    return full[len(kernel) - 1 : len(kernel) - 1 + n]


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(x, (0, 0), sigma) for [H, W] or [H, W, C] arrays, separable, with reflected
    borders (BORDER_REFLECT_101, numpy's ``reflect``). uint8 in -> uint8 out, rounded (cv2 uses fixed
    point there, so it may differ by 1); float in -> float32 out.

    cv2 sizes the kernel from sigma: ``round(2 * 3 * sigma + 1) | 1`` taps for uint8 images, ``4 *``
    instead of ``3 *`` for float images."""
    is_u8 = x.dtype == np.uint8
    ksize = math.floor(sigma * (3 if is_u8 else 4) * 2 + 1 + 0.5) | 1
    kernel = gaussian_kernel(sigma, ksize)
    r = ksize // 2
    y = x.astype(np.float64)
    if r > 0:
        for axis in (1, 0):
            moved = np.moveaxis(y, axis, 0)
            pad = [(r, r)] + [(0, 0)] * (y.ndim - 1)
            padded = np.pad(moved, pad, mode="reflect" if moved.shape[0] > 1 else "edge")
            y = np.moveaxis(_correlate_axis0(padded, kernel, moved.shape[0]), 0, axis)
    if is_u8:
        return np.floor(y + 0.5).clip(0, 255).astype(np.uint8)
    return y.astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as Pillow's ``convert("L")`` computes it: [H, W] float64 in 0..255."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# ---------------------------------------------------------------------------------------------------
# Canny, as cv2.Canny(image, low, high) computes it (apertureSize 3, L2gradient False)

_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)  # tan(22.5 deg), fixed point


def canny_edges(rgb: np.ndarray, low_threshold: int, high_threshold: int) -> np.ndarray:
    """[H, W(, C)] uint8 -> [H, W] bool edges, as OpenCV's ``cv2.Canny`` (imgproc/src/canny.cpp) finds them.

    cv2.Canny does not blur first: a 3x3 Sobel per channel (borders replicated); the gradient magnitude
    is L1 (|dx| + |dy|), and on colour images each pixel takes the channel with the largest magnitude
    (the first on ties) and that channel's dx, dy. Non-maximum suppression compares the magnitude with
    its two neighbours along the gradient, the direction binned into 0 / 45 / 90 / 135 degrees by
    fixed-point tan(22.5) (strict ``>`` against the left / upper neighbour, ``>=`` against the right /
    lower one, strict both ways on diagonals; outside the image counts as 0). Hysteresis keeps the
    8-connected chains of surviving pixels above ``low_threshold`` that hold one above
    ``high_threshold`` (both strict).
    """
    x = rgb.astype(np.int32)
    if x.ndim == 2:
        x = x[:, :, None]
    dx, dy = _sobel(x)  # [H, W, C] each
    mag_c = np.abs(dx) + np.abs(dy)
    pick = np.argmax(mag_c, axis=2)[:, :, None]  # first maximum, as cv2's strict '>' scan
    mag = np.take_along_axis(mag_c, pick, axis=2)[:, :, 0].astype(np.int64)
    xs = np.take_along_axis(dx, pick, axis=2)[:, :, 0].astype(np.int64)
    ys = np.take_along_axis(dy, pick, axis=2)[:, :, 0].astype(np.int64)

    mp = np.pad(mag, 1)  # zeros outside the image, as cv2's magnitude ring buffer
    left, right = mp[1:-1, :-2], mp[1:-1, 2:]
    up, down = mp[:-2, 1:-1], mp[2:, 1:-1]
    up_left, up_right = mp[:-2, :-2], mp[:-2, 2:]
    down_left, down_right = mp[2:, :-2], mp[2:, 2:]

    ax = np.abs(xs)
    ay = np.abs(ys) << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    same_sign = (xs ^ ys) >= 0  # s = +1: compare upper-left and lower-right
    keep = np.where(
        horizontal,
        (mag > left) & (mag >= right),
        np.where(
            vertical,
            (mag > up) & (mag >= down),
            np.where(same_sign, (mag > up_left) & (mag > down_right), (mag > up_right) & (mag > down_left)),
        ),
    )
    candidate = keep & (mag > low_threshold)
    strong = candidate & (mag > high_threshold)
    return _hysteresis(candidate, strong)


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``candidate`` that hold a ``strong`` pixel (a stack walk over the
    candidate pixels only, as cv2's; these are a few per cent of an image)."""
    h, w = candidate.shape
    stride = w + 2
    state = np.zeros((h + 2, w + 2), dtype=np.uint8)  # 0: not an edge, 1: candidate, 2: edge
    state[1:-1, 1:-1][candidate] = 1
    state[1:-1, 1:-1][strong] = 2
    flat = state.reshape(-1)
    stack = np.flatnonzero(flat == 2).tolist()
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    while stack:
        i = stack.pop()
        for o in offsets:
            j = i + o
            if flat[j] == 1:
                flat[j] = 2
                stack.append(j)
    return state[1:-1, 1:-1] == 2


# ---------------------------------------------------------------------------------------------------
# The preprocessors: RGB PIL image in, RGB PIL image of the same size out


def none(image: Image.Image) -> Image.Image:
    """The extension's ``none``: the image unchanged (as RGB)."""
    return _to_image(_rgb_array(image))


def canny(
    image: Image.Image,
    low_threshold: int = int(CANNY_LOW.default),
    high_threshold: int = int(CANNY_HIGH.default),
) -> Image.Image:
    """The extension's ``canny``: ``cv2.Canny(rgb, low, high)`` (see :func:`canny_edges`), white edges on black."""
    low = int(CANNY_LOW.check(low_threshold, "canny"))
    high = int(CANNY_HIGH.check(high_threshold, "canny"))
    if low > high:
        raise SdStudioError(f"canny: low_threshold ({low}) must not exceed high_threshold ({high})")
    edges = canny_edges(_rgb_array(image), low, high)
    return _to_image(edges.astype(np.uint8) * 255)


def invert(image: Image.Image) -> Image.Image:
    """The extension's ``invert`` ("invert (from white bg & black line)"): ``255 - image``, so black lines
    drawn on white become the white-on-black lines the Canny / lineart / scribble / MLSD models take."""
    return _to_image(255 - _rgb_array(image))


def threshold(image: Image.Image, threshold: int = int(THRESHOLD.default)) -> Image.Image:
    """The extension's ``threshold``: white where every channel is brighter than ``threshold``
    (``min(R, G, B) > threshold``), black elsewhere."""
    t = int(THRESHOLD.check(threshold, "threshold"))
    bright = _rgb_array(image).min(axis=2) > t
    return _to_image(bright.astype(np.uint8) * 255)


def scribble_threshold(image: Image.Image, threshold: int = int(THRESHOLD.default)) -> Image.Image:
    """A scribble from black lines on white (ours, alias ``scribble``): white where every channel is darker
    than ``threshold`` (``max(R, G, B) < threshold``), black elsewhere. It equals the extension's
    ``invert`` followed by its ``threshold`` at ``255 - threshold``."""
    t = int(THRESHOLD.check(threshold, "scribble_threshold"))
    dark = _rgb_array(image).max(axis=2) < t
    return _to_image(dark.astype(np.uint8) * 255)


def scribble_xdog(image: Image.Image, threshold: int = int(XDOG_THRESHOLD.default)) -> Image.Image:
    """The extension's ``scribble_xdog``: a difference of Gaussians (sigma 0.5 and 5.0 on float pixels);
    ``d = min over channels of (wide - narrow)``, truncated to 0..255, is how much darker a pixel is than
    its surroundings; white where ``2 * d > threshold``. (The extension's uint8 ``2 * d`` wraps for d in
    128..143; here it does not.)"""
    t = int(XDOG_THRESHOLD.check(threshold, "scribble_xdog"))
    img = _rgb_array(image).astype(np.float32)
    g1 = gaussian_blur(img, 0.5)
    g2 = gaussian_blur(img, 5.0)
    d = np.min(g2 - g1, axis=2).clip(0, 255)
    darkness = (255 - (255 - d).clip(0, 255).astype(np.uint8)).astype(np.int32)  # the extension's uint8 'dog'
    return _to_image((2 * darkness > t).astype(np.uint8) * 255)


def softedge_sobel(image: Image.Image, sigma: float = SOBEL_SIGMA.default) -> Image.Image:
    """A soft edge map (ours): the Sobel gradient magnitude ``sqrt(dx^2 + dy^2)`` of the luma, after an
    optional Gaussian blur of ``sigma`` (0: none), scaled so its maximum is 255 (a flat image gives black).

    It stands in for the extension's ``softedge_hed`` / ``softedge_pidinet``, which need downloaded
    HED / PiDiNet weights: the same kind of map (bright, soft, graded edges on black) for the SoftEdge
    models, not the same values."""
    s = SOBEL_SIGMA.check(sigma, "softedge_sobel")
    luma = _luma(_rgb_array(image).astype(np.float64))
    if s > 0:
        luma = gaussian_blur(luma.astype(np.float32), s).astype(np.float64)
    dx, dy = _sobel(luma)
    mag = np.hypot(dx, dy)
    peak = mag.max()
    out = (
        np.zeros(mag.shape, np.uint8) if peak <= 1e-6 else np.floor(mag / peak * 255.0 + 0.5).astype(np.uint8)
    )
    return _to_image(out)


def blur_gaussian(image: Image.Image, sigma: float = BLUR_SIGMA.default) -> Image.Image:
    """The extension's ``blur_gaussian`` (a Tile preprocessor): ``cv2.GaussianBlur(img, (0, 0), sigma)``."""
    s = BLUR_SIGMA.check(sigma, "blur_gaussian")
    return _to_image(gaussian_blur(_rgb_array(image), s))


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: output pixel i averages the input over [i * s, (i + 1) * s), s = n_in / n_out,
    each input pixel weighted by its overlap."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + s, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resize_area(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(arr, (width, height), interpolation=INTER_AREA) when shrinking a uint8 [H, W(, C)]
    array: each output pixel the overlap-weighted mean of the input pixels it covers, rounded. (Pillow's
    BOX filter weighs whole pixels in or out, which is up to 32 levels off at non-integer factors.)"""
    wy = _area_weights(arr.shape[0], height)
    wx = _area_weights(arr.shape[1], width)
    rows = np.tensordot(wy, arr.astype(np.float64), axes=(1, 0))  # [height, W(, C)]
    out = np.moveaxis(np.tensordot(wx, rows, axes=(1, 1)), 0, 1)  # [height, width(, C)]
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def tile_resample(image: Image.Image, down_sampling_rate: float = DOWN_SAMPLING_RATE.default) -> Image.Image:
    """The extension's ``tile_resample``: below a rate of 1.1 the image unchanged; else shrunk to
    ``int(H / rate) x int(W / rate)`` by area averaging (cv2.INTER_AREA, :func:`resize_area`), then, unlike the
    extension, which hands the small image to its resize step, brought back to the input size with
    bicubic interpolation, as that step does when it enlarges a photo-like map."""
    rate = DOWN_SAMPLING_RATE.check(down_sampling_rate, "tile_resample")
    rgb = _rgb_array(image)
    if rate < 1.1:
        return _to_image(rgb)
    h, w = rgb.shape[:2]
    small = resize_area(rgb, max(1, int(w / rate)), max(1, int(h / rate)))
    return _to_image(small).resize((w, h), Image.Resampling.BICUBIC)


def _resize_cubic_cv2(
    x: np.ndarray, out_h: int, out_w: int, top: int = 0, left: int = 0, h: int = 0, w: int = 0
) -> np.ndarray:
    """cv2.resize(x, (out_w, out_h), interpolation=INTER_CUBIC)[top : top + h, left : left + w] for a
    float [H, W] array (h, w of 0: the whole output): half-pixel centres, Keys' cubic with a = -0.75,
    source indices clamped at the borders. Only the cropped window is computed."""

    def weights(n_in: int, n_out: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        f = (np.arange(start, start + count) + 0.5) * (n_in / n_out) - 0.5
        s = np.floor(f)
        t = f - s
        a = -0.75
        c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
        c1 = ((a + 2) * t - (a + 3)) * t * t + 1
        c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
        c3 = 1.0 - c0 - c1 - c2
        idx = np.clip(s.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
        return idx, np.stack([c0, c1, c2, c3], axis=1)

    yi, yw = weights(x.shape[0], out_h, top, h or out_h)
    xi, xw = weights(x.shape[1], out_w, left, w or out_w)
    rows = (x[yi] * yw[:, :, None]).sum(axis=1)  # [h, W]
    return (rows[:, xi] * xw[None, :, :]).sum(axis=2)  # [h, w]


def _noise_disk(rng: np.random.RandomState, h: int, w: int, cell: int) -> np.ndarray:
    """The extension's ``make_noise_disk(h, w, 1, cell)``: uniform noise on a grid of ``cell``-pixel cells,
    bicubically enlarged to (h + 2 cell) x (w + 2 cell), its middle h x w kept and rescaled to 0..1."""
    grid = rng.uniform(low=0, high=1, size=((h // cell) + 2, (w // cell) + 2, 1))[:, :, 0]
    noise = _resize_cubic_cv2(grid, h + 2 * cell, w + 2 * cell, cell, cell, h, w)
    noise = noise - noise.min()
    peak = noise.max()
    return noise / peak if peak > 0 else noise


def _remap_bilinear(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """cv2.remap(img, (map_x, map_y), None, INTER_LINEAR) for uint8 [H, W, 3] and maps inside the image:
    coordinates rounded to 1/32 pixel (cv2's INTER_TAB_SIZE), then bilinear weights, rounded."""
    h, w = img.shape[:2]
    qx = np.floor(map_x * 32 + 0.5).astype(np.int64)
    qy = np.floor(map_y * 32 + 0.5).astype(np.int64)
    x0, y0 = qx >> 5, qy >> 5
    fx, fy = ((qx & 31) / 32.0)[:, :, None], ((qy & 31) / 32.0)[:, :, None]
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    x0, y0 = np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1)
    src = img.astype(np.float64)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    return np.floor(top * (1 - fy) + bottom * fy + 0.5).clip(0, 255).astype(np.uint8)


def shuffle(image: Image.Image, seed: int = int(SEED.default)) -> Image.Image:
    """The extension's ``shuffle`` (content shuffle, ``annotator/shuffle``): a random smooth flow field
    warps the image. Two noise fields (x first, then y), each uniform noise on a grid of cells bicubically
    enlarged and rescaled to 0..1, times W - 1 and H - 1, give every output pixel the source position it
    samples, bilinearly.

    The noise comes from ``numpy.random.RandomState(seed)``, the generator the extension seeds with
    ``np.random.seed`` (A1111 passes ``(seed + subseed) & 0xFFFFFFFF``), so a seed gives the same field.
    The extension runs at a short side of 512 with 256-pixel cells; here cells are half the short side,
    which is the same field at 512 and the same field scaled at other sizes.
    """
    s = int(SEED.check(seed, "shuffle"))
    img = _rgb_array(image)
    h, w = img.shape[:2]
    cell = max(1, min(h, w) // 2)
    rng = np.random.RandomState(s)
    map_x = _noise_disk(rng, h, w, cell) * float(w - 1)
    map_y = _noise_disk(rng, h, w, cell) * float(h - 1)
    return _to_image(_remap_bilinear(img, map_x.astype(np.float32), map_y.astype(np.float32)))


# ---------------------------------------------------------------------------------------------------
# Control images and the inpaint protocol


@dataclass(frozen=True)
class ControlImage:
    """A preprocessor's result.

    ``image``: the RGB control image (what a UI shows). ``hint``: [H, W, 3] float32, what ControlNet's
    hint input takes for it (the extension's ``get_pytorch_control``: ``image / 255``, 0..1; for the
    inpaint preprocessors, -1 where masked). ``mask``: [H, W] bool, True where the inpaint model repaints
    (None for the others)."""

    image: Image.Image
    hint: np.ndarray
    mask: np.ndarray | None = None


def control_hint(image: Image.Image) -> np.ndarray:
    """[H, W, 3] float32 in 0..1: the hint ControlNet takes for an RGB control image."""
    return _rgb_array(image).astype(np.float32) / 255.0


def _mask_array(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W] bool, True where masked: a PIL mask (any mode, as its luma) or an array, > 127 (bool: as is)."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"))
    elif isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 3:
            arr = arr.max(axis=2)
    else:
        raise SdStudioError(f"inpaint: mask must be a PIL image or a numpy array, got {type(mask).__name__}")
    if arr.shape != (size[1], size[0]):
        raise SdStudioError(
            f"inpaint: the mask is {arr.shape[1]}x{arr.shape[0]} but the image is {size[0]}x{size[1]}; "
            "pass a mask of the image's size"
        )
    return arr.astype(bool) if arr.dtype == bool else arr > 127


def inpaint(image: Image.Image, mask: Image.Image | np.ndarray) -> ControlImage:
    """The extension's ``inpaint`` ("inpaint_global_harmonious") and ``inpaint_only``: the ControlNet
    inpaint model's hint.

    The extension carries the mask as the control image's alpha channel (binarised at > 127) and, at
    the UNet (``scripts/hook.py``, "ControlNet inpaint protocol"), turns the RGBA hint ``c, m`` in 0..1
    into ``c * (1 - m) - m``: unmasked pixels keep ``RGB / 255`` (0..1, not -1..1) and masked ones
    become -1 in all three channels, as lllyasviel's ControlNet 1.1 inpaint model was trained. That
    array is ``hint``; ``image`` is the extension's preview (masked pixels at half opacity, here
    composited over white); ``mask`` is True where masked.

    The two preprocessors give the same hint; ``inpaint_only`` differs later, in the pipeline: it keeps
    the unmasked area (the result is blended back with the original through the mask blurred with
    sigma 7, the extension's ``control_net_inpaint_blur_sigma``).
    """
    rgb = _rgb_array(image)
    m = _mask_array(mask, image.size)
    hint = rgb.astype(np.float32) / 255.0
    hint[m] = -1.0
    alpha = np.where(m, 255 - 255 // 2, 255).astype(np.float32)[:, :, None] / 255.0  # 255 - mask // 2
    preview = (rgb.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return ControlImage(image=_to_image(preview), hint=hint, mask=m)


# ---------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Preprocessor:
    """A registered preprocessor: ``name`` as the extension spells it (or ours where it has none),
    ``label`` as its UI shows it, ``params`` in the order of the extension's sliders (threshold_a,
    threshold_b)."""

    name: str
    label: str
    run: Callable[..., ControlImage]
    params: tuple[Param, ...] = ()
    needs_mask: bool = False
    needs_weights_in_extension: bool = False  # True for our stand-ins of model-based preprocessors

    def describe(self) -> str:
        """What it takes, e.g. ``low_threshold (an integer in 0..255, default 100), ...``."""
        takes = ", ".join(p.describe() for p in self.params) or "no parameters"
        return takes + (" and a mask" if self.needs_mask else "")


def _image_only(fn: Callable[..., Image.Image]) -> Callable[..., ControlImage]:
    def run(image: Image.Image, **params: object) -> ControlImage:
        out = fn(image, **params)
        return ControlImage(image=out, hint=control_hint(out))

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _registry() -> dict[str, Preprocessor]:
    entries = (
        Preprocessor("none", "none", _image_only(none)),
        Preprocessor("canny", "canny", _image_only(canny), (CANNY_LOW, CANNY_HIGH)),
        Preprocessor("invert", "invert (from white bg & black line)", _image_only(invert)),
        Preprocessor("threshold", "threshold", _image_only(threshold), (THRESHOLD,)),
        Preprocessor(
            "scribble_threshold", "scribble_threshold", _image_only(scribble_threshold), (THRESHOLD,)
        ),
        Preprocessor("scribble_xdog", "scribble_xdog", _image_only(scribble_xdog), (XDOG_THRESHOLD,)),
        Preprocessor(
            "softedge_sobel",
            "softedge_sobel",
            _image_only(softedge_sobel),
            (SOBEL_SIGMA,),
            needs_weights_in_extension=True,
        ),
        Preprocessor("shuffle", "shuffle", _image_only(shuffle), (SEED,)),
        Preprocessor("tile_resample", "tile_resample", _image_only(tile_resample), (DOWN_SAMPLING_RATE,)),
        Preprocessor("blur_gaussian", "blur_gaussian", _image_only(blur_gaussian), (BLUR_SIGMA,)),
        Preprocessor("inpaint", "inpaint_global_harmonious", inpaint, needs_mask=True),
        Preprocessor("inpaint_only", "inpaint_only", inpaint, needs_mask=True),
    )
    return {p.name: p for p in entries}


PREPROCESSORS: dict[str, Preprocessor] = _registry()

# Other spellings -> a name in PREPROCESSORS: the extension's labels (its API takes a label or a name) and ours.
ALIASES: dict[str, str] = {
    **{p.label: p.name for p in PREPROCESSORS.values() if p.label != p.name},
    "scribble": "scribble_threshold",
    "tile": "tile_resample",
    "sobel": "softedge_sobel",
    "identity": "none",
}


def _resolve(name: str) -> Preprocessor:
    """A name or alias as given, else in lower case (``Canny``, ``Inpaint_Only``)."""
    key = None
    if isinstance(name, str):
        for candidate in (name, name.strip().lower()):
            key = candidate if candidate in PREPROCESSORS else ALIASES.get(candidate)
            if key is not None:
                break
    if key is None:
        known = ", ".join(PREPROCESSORS)
        aliases = ", ".join(f"{a} -> {n}" for a, n in ALIASES.items())
        raise SdStudioError(f"unknown ControlNet preprocessor {name!r}; known: {known} (aliases: {aliases})")
    return PREPROCESSORS[key]


def resolve_preprocessor(name: str) -> str:
    """The registry name of preprocessor ``name`` (a name, an alias or the extension's label, any case);
    ``SdStudioError`` listing the names for an unknown one."""
    return _resolve(name).name


def preprocess(
    name: str,
    image: Image.Image,
    *,
    mask: Image.Image | np.ndarray | None = None,
    **params: object,
) -> ControlImage:
    """Run the preprocessor called ``name`` (a name in :data:`PREPROCESSORS` or :data:`ALIASES`) on
    ``image`` with ``params`` (each checked against its range; unknown names refused). ``mask`` is for
    the inpaint preprocessors only, and they need it. Errors are :class:`SdStudioError`s that name the
    preprocessors or the parameter and its range."""
    pre = _resolve(name)
    allowed = {p.name for p in pre.params}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SdStudioError(
            f"{pre.name}: unknown parameter {', '.join(map(repr, unknown))}; it takes {pre.describe()}"
        )
    if pre.needs_mask and mask is None:
        raise SdStudioError(f"{pre.name}: needs a mask (white where the image is repainted)")
    if not pre.needs_mask and mask is not None:
        raise SdStudioError(
            f"{pre.name}: takes no mask (only {', '.join(n for n, p in PREPROCESSORS.items() if p.needs_mask)} do)"
        )
    logger.debug("ControlNet preprocessor %s on a %dx%d image, %s", pre.name, *image.size, params)
    if pre.needs_mask:
        return pre.run(image, mask)
    return pre.run(image, **params)


# ---------------------------------------------------------------------------------------------------
# Resize modes


class ResizeMode(str, Enum):
    """The extension's resize modes for control images (``scripts/enums.py``); ``Crop and Resize`` is its
    default."""

    JUST_RESIZE = "Just Resize"
    CROP_AND_RESIZE = "Crop and Resize"
    RESIZE_AND_FILL = "Resize and Fill"


# The extension's older spellings (internal_controlnet/args.py) and A1111's API integers 0, 1, 2.
_RESIZE_ALIASES: Mapping[str, ResizeMode] = {
    "inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE,
    "scale to fit (inner fit)": ResizeMode.CROP_AND_RESIZE,
    "outer fit (shrink to fit)": ResizeMode.RESIZE_AND_FILL,
    "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL,
    **{m.value.lower(): m for m in ResizeMode},
}


def parse_resize_mode(mode: ResizeMode | str | int) -> ResizeMode:
    """A :class:`ResizeMode` from itself, its text (any case, or the extension's older names) or 0 / 1 / 2."""
    if isinstance(mode, ResizeMode):
        return mode
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(ResizeMode):
        return list(ResizeMode)[mode]
    if isinstance(mode, str) and mode.strip().lower() in _RESIZE_ALIASES:
        return _RESIZE_ALIASES[mode.strip().lower()]
    names = ", ".join(repr(m.value) for m in ResizeMode)
    raise SdStudioError(f"unknown control resize mode {mode!r}; use one of {names} (or 0, 1, 2)")


def _otsu(gray: np.ndarray) -> int:
    """cv2's THRESH_OTSU threshold of a uint8 array: the first level maximising the between-class variance."""
    hist = np.bincount(gray.reshape(-1), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    levels = np.arange(256, dtype=np.float64)
    q1 = np.cumsum(p)
    mu_total = (p * levels).sum()
    mu_cum = np.cumsum(p * levels)
    q2 = 1.0 - q1
    valid = (np.minimum(q1, q2) >= np.finfo(np.float32).eps) & (
        np.maximum(q1, q2) <= 1.0 - np.finfo(np.float32).eps
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = mu_cum / q1
        mu2 = (mu_total - mu_cum) / q2
        sigma = np.where(valid, q1 * q2 * (mu1 - mu2) ** 2, -1.0)
    return int(np.argmax(sigma)) if sigma.max() > 0 else 0


def _hq_resize(
    arr: np.ndarray, size: tuple[int, int], mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The extension's ``high_quality_resize`` of a [H, W, 3] uint8 map (and a [H, W] uint8 mask) to
    ``size`` (w, h): 3..199 colours -> nearest (segmentation maps keep their colours); else area when
    the pixel count shrinks (bicubic if one side grows), bicubic otherwise; a black-and-white map is
    then re-binarised with Otsu. A mask is resized alike and binarised at > 127."""
    h, w = arr.shape[:2]
    if (w, h) == size:
        return arr, mask
    packed = (arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2]
    colours = len(np.unique(packed))
    is_binary = colours == 2 and arr.min() < 16 and arr.max() > 240
    if 2 < colours < 200:
        resample: Image.Resampling | None = Image.Resampling.NEAREST
    elif size[0] * size[1] < w * h:
        resample = None  # area
    else:
        resample = Image.Resampling.BICUBIC

    def resize(x: np.ndarray) -> np.ndarray:
        if resample is None and size[0] <= x.shape[1] and size[1] <= x.shape[0]:
            return resize_area(x, *size)
        return np.asarray(
            Image.fromarray(x).resize(size, Image.Resampling.BICUBIC if resample is None else resample)
        )

    out = resize(arr)
    if is_binary:
        gray = out.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        binary = np.where(gray > _otsu(gray), 255, 0).astype(np.uint8)
        out = np.repeat(binary[:, :, None], 3, axis=2)
    if mask is not None:
        resized = resize(mask)
        mask = np.where(resized > 127, 255, 0).astype(np.uint8)
    return out, mask


def _fit(
    arr: np.ndarray, mask: np.ndarray | None, width: int, height: int, mode: ResizeMode
) -> tuple[np.ndarray, np.ndarray | None]:
    """The extension's ``detectmap_proc`` geometry (``scripts/controlnet.py``)."""
    if mode is ResizeMode.JUST_RESIZE:
        return _hq_resize(arr, (width, height), mask)
    old_h, old_w = arr.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if mode is ResizeMode.RESIZE_AND_FILL:
        k = min(k0, k1)
        # The fill is the median colour of the map's four borders; for inpaint it is masked, so the model
        # paints the added area (outpainting).
        borders = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
        colour = np.median(borders, axis=0).astype(np.uint8)
        canvas = np.tile(colour[None, None], (height, width, 1))
        canvas_mask = None if mask is None else np.full((height, width), 255, np.uint8)
        new_size = (int(np.round(old_w * k)), int(np.round(old_h * k)))
        small, small_mask = _hq_resize(arr, new_size, mask)
        new_h, new_w = small.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        canvas[top : top + new_h, left : left + new_w] = small
        if canvas_mask is not None and small_mask is not None:
            canvas_mask[top : top + new_h, left : left + new_w] = small_mask
        return canvas, canvas_mask
    k = max(k0, k1)
    big, big_mask = _hq_resize(arr, (int(np.round(old_w * k)), int(np.round(old_h * k))), mask)
    new_h, new_w = big.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    big = big[top : top + height, left : left + width]
    if big_mask is not None:
        big_mask = big_mask[top : top + height, left : left + width]
    return big, big_mask


def _check_size(width: int, height: int) -> None:
    for label, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SdStudioError(f"resize_control: {label} must be a positive integer, got {v!r}")


def resize_control(
    image: Image.Image,
    width: int,
    height: int,
    mode: ResizeMode | str | int = ResizeMode.CROP_AND_RESIZE,
) -> Image.Image:
    """Fit a control image to ``width`` x ``height`` as the extension does before ControlNet sees it.

    - "Just Resize": stretch to the size.
    - "Crop and Resize" (the default): scale to cover the size (the larger of the two ratios), then crop
      the middle.
    - "Resize and Fill": scale to fit inside (the smaller ratio), centred on a canvas of the median
      colour of the image's four borders (black for an edge map on black).

    Both scalings round the scaled size to whole pixels and offset by ``(difference) // 2``. The
    interpolation depends on the content, as the extension's ``high_quality_resize`` picks it."""
    _check_size(width, height)
    m = parse_resize_mode(mode)
    out, _ = _fit(_rgb_array(image), None, int(width), int(height), m)
    return _to_image(out)


def resize_inpaint_control(
    image: Image.Image,
    mask: Image.Image | np.ndarray,
    width: int,
    height: int,
    mode: ResizeMode | str | int = ResizeMode.CROP_AND_RESIZE,
) -> tuple[Image.Image, Image.Image]:
    """:func:`resize_control` for an inpaint image and its mask together (the extension resizes them as
    one RGBA map): the mask follows the image and is re-binarised at > 127; with "Resize and Fill" the
    added border is masked, so the inpaint model outpaints it. Returns (RGB image, L mask: 255 = masked)."""
    _check_size(width, height)
    m = parse_resize_mode(mode)
    mask_u8 = _mask_array(mask, image.size).astype(np.uint8) * 255
    out, out_mask = _fit(_rgb_array(image), mask_u8, int(width), int(height), m)
    assert out_mask is not None
    return _to_image(out), Image.fromarray(out_mask, "L")
