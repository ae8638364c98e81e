"""A1111's hr_resize_x / hr_resize_y: the second pass's size as A1111 computes it, as a hires scale."""

import pytest

from sdstudio.pipelines.hires import hires_size
from sdstudio.server.a1111 import FieldError, ServerLimits, to_request

LIMITS = ServerLimits(max_size=2048, default_size=None)


def _hires(width: int, height: int, **resize: int):
    payload = {"prompt": "a red ball", "width": width, "height": height, "enable_hr": True, "hr_scale": 3.0}
    return to_request("txt2img", payload | resize, LIMITS).hires


@pytest.mark.parametrize(
    ("width", "height", "resize", "size"),
    [
        (64, 48, {"hr_resize_x": 96}, (96, 72)),
        (64, 48, {"hr_resize_y": 96}, (128, 96)),
        (64, 48, {"hr_resize_x": 128, "hr_resize_y": 96}, (128, 96)),
        (512, 768, {"hr_resize_x": 1024}, (1024, 1536)),
        (512, 512, {"hr_resize_y": 1000}, (1000, 1000)),
    ],
)
def test_resize_gives_a1111s_second_pass_size(width, height, resize, size):
    hires = _hires(width, height, **resize)
    assert (int(width * hires.scale), int(height * hires.scale)) == size  # hr_scale 3.0 ignored, as in A1111
    assert hires_size(width, height, hires.scale)[0] == (size[0] // 8 * 8, size[1] // 8 * 8)


def test_every_one_sided_resize_maps_exactly():
    for width in range(8, 257, 24):
        for height in range(8, 257, 40):
            for side in range(8, 700, 56):
                h = _hires(width, height, hr_resize_x=side)
                assert (int(width * h.scale), int(height * h.scale)) == (side, side * height // width)
                h = _hires(width, height, hr_resize_y=side)
                assert (int(width * h.scale), int(height * h.scale)) == (side * width // height, side)


def test_a_resize_that_would_crop_or_lacks_the_size_is_refused_naming_the_field():
    with pytest.raises(FieldError, match="hr_resize_x: a second pass of 128x128 is not one scale"):
        _hires(64, 48, hr_resize_x=128, hr_resize_y=128)
    payload = {"prompt": "a", "enable_hr": True, "hr_resize_x": 128}
    with pytest.raises(FieldError, match="give width and height"):
        to_request("txt2img", payload, LIMITS)
    assert _hires(64, 48).scale == 3.0
