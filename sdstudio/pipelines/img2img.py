"""img2img and inpainting inputs in pixel space: the init image and mask brought to the generation size,
and what is needed afterwards to put the original pixels back."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdstudio.io.images import flatten, resize_image
from sdstudio.pipelines.inpaint import (
    Box,
    blur_mask,
    crop_region,
    expand_to_ratio,
    fill,
    outpaint_canvas,
    overlay,
)
from sdstudio.types import GenerationRequest


@dataclass(frozen=True)
class SourceImage:
    """The init image at the generation size, and for inpainting its mask and the paste-back data."""

    image: Image.Image  # RGB, width x height: what is encoded (masked area filled for "fill")
    mask: Image.Image | None = None  # L, width x height, blurred; white = repaint
    overlay: Image.Image | None = None  # RGBA at the output size: original pixels, opaque where kept
    base: Image.Image | None = None  # "only masked": the full-size original the result is pasted into
    box: Box | None = None  # "only masked": where on ``base``
    warnings: tuple[str, ...] = ()


def prepare_source(request: GenerationRequest, width: int, height: int) -> SourceImage:
    """AUTOMATIC1111's ``StableDiffusionProcessingImg2Img.init`` for one image (mask blur, only-masked crop,
    resize mode, overlay, masked-content fill), plus outpainting as a padded canvas and mask."""
    assert request.init is not None
    image = flatten(request.init.image)
    inpaint = request.inpaint
    if inpaint is None:
        return SourceImage(resize_image(image, width, height, request.init.resize_mode))
    warnings: list[str] = []
    mask = inpaint.mask.convert("L") if inpaint.mask is not None else None
    if mask is not None and mask.size != image.size:
        warnings.append(
            f"mask size {mask.width}x{mask.height} differs from the image's {image.width}x{image.height}: mask resized to it"
        )
        mask = mask.resize(image.size, Image.LANCZOS)
    if inpaint.outpaint.any:
        image, mask = outpaint_canvas(image, mask, inpaint.outpaint, inpaint.blur)
    assert mask is not None
    mask = blur_mask(mask, inpaint.blur)
    box = None
    if inpaint.only_masked:
        region = crop_region(mask, inpaint.only_masked_padding)
        if region is None:
            warnings.append("the mask is blank: nothing to inpaint, so the whole picture is processed")
        else:
            box = expand_to_ratio(region, width, height, mask.width, mask.height)
    if box is not None:
        over = overlay(image, mask)
        base = image
        mask = resize_image(mask.crop(box), width, height, "resize and fill")
        image = resize_image(image.crop(box), width, height, "resize and fill")
    else:
        base = None
        mask = resize_image(mask, width, height, request.init.resize_mode)
        image = resize_image(image, width, height, request.init.resize_mode)
        # doubled so partly masked pixels (the blur's outer half) show the generated image fully
        over = overlay(image, mask.point(lambda v: min(255, 2 * v)))
    if inpaint.masked_content == "fill":
        image = fill(image, mask)
    return SourceImage(image, mask, over, base, box, tuple(warnings))
