"""The upscaler architectures most upscaler files hold, with their hyperparameters read from the state dict.

- **ESRGAN** (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks",
  arXiv:1809.00219): ``RRDBNet``, a trunk of Residual-in-Residual Dense Blocks at the input's resolution, then
  x2 nearest-neighbour upsampling + conv stages. Its modules are named as the *old* ESRGAN layout
  (``model.0.weight``, ``model.1.sub.N.RDB1.conv1.0.weight``, ...: 4x-UltraSharp, 4x_foolhardy_Remacri and
  most community files), so those load with ``load_state_dict`` as they are. Real-ESRGAN's *new* layout
  (``conv_first``, ``body.N.rdb1.conv1``, ``conv_body``, ``conv_up1``, ``conv_hr``, ``conv_last``: BasicSR's
  ``rrdbnet_arch.py``; RealESRGAN_x4plus.pth) and BSRGAN / RealSR's (``RRDB_trunk``, ``trunk_conv``,
  ``upconv1``, ``HRconv``) are renamed to it by :func:`rrdb_old_layout`, the one place keys are converted.
  Real-ESRGAN x2 / x1 files run their trunk on a pixel-unshuffled input (Wang et al. 2021, "Real-ESRGAN",
  arXiv:2107.10833, section 4.4): ``in_nc`` is 4 or 16 times ``out_nc``.
- **Real-ESRGAN Compact** (``SRVGGNetCompact``, Real-ESRGAN's ``srvgg_arch.py``: realesr-general-x4v3,
  realesr-animevideov3): a plain stack ``body.N`` of 3x3 convs with PReLUs at the input's resolution, a
  pixel shuffle, plus the nearest-upsampled input.

Hyperparameters come from key names and tensor shapes only (as spandrel's detection does); a file that is
neither is refused naming what it looks like (:func:`describe_unknown`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

__all__ = [
    "CompactConfig",
    "RRDBConfig",
    "RRDBNet",
    "SRVGGNetCompact",
    "compact_config",
    "describe_unknown",
    "is_compact",
    "is_rrdb",
    "rrdb_config",
    "rrdb_old_layout",
]

StateDict = Mapping[str, Tensor]


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, 1, 1)


# --------------------------------------------------------------------------------------------- ESRGAN


@dataclass(frozen=True)
class RRDBConfig:
    """An ``RRDBNet``: channels, trunk size and the number of x2 upsampling stages.

    ``shuffle`` is Real-ESRGAN's pixel-unshuffle factor of the input (1: none; 2 for x2 files, 4 for x1), so
    the image is enlarged ``2 ** upsamples // shuffle`` times.
    """

    in_nc: int = 3  # channels the first conv reads (after the unshuffle: 3 * shuffle ** 2)
    out_nc: int = 3
    nf: int = 64  # trunk features
    nb: int = 23  # RRDB blocks
    gc: int = 32  # growth channels of each dense block
    upsamples: int = 2
    shuffle: int = 1
    plus: bool = False  # ESRGAN+ (Rakotonirina & Rasoanaivo 2020): a 1x1 conv path in each dense block

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.shuffle

    @property
    def image_channels(self) -> int:
        return self.in_nc // self.shuffle**2

    @property
    def align(self) -> int:  # tiles start at multiples of this: the unshuffle's cells, cut as the whole image
        return self.shuffle

    def describe(self) -> str:
        kind = "ESRGAN+" if self.plus else "ESRGAN"
        unshuffle = f", pixel-unshuffle {self.shuffle}" if self.shuffle > 1 else ""
        return f"{kind} x{self.scale} ({self.nf}nf, {self.nb}nb, {self.gc}gc{unshuffle})"


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each reading the block's input and every earlier conv's output (a dense block); the
    last one's output, scaled by ``residual_scale``, is added to the input (ESRGAN section 3.1, Fig. 4)."""

    residual_scale: float = 0.2

    def __init__(self, nf: int, gc: int, plus: bool = False) -> None:
        super().__init__()
        # ESRGAN+: conv1x1 (no bias) adds the block input to conv2's output; conv2's output to conv4's
        self.conv1x1 = nn.Conv2d(nf, gc, 1, bias=False) if plus else None
        lrelu = nn.LeakyReLU(0.2, inplace=True)
        # the old layout names each conv inside a Sequential (conv1.0), the activation after it (conv1.1)
        self.conv1 = nn.Sequential(_conv(nf, gc), lrelu)
        self.conv2 = nn.Sequential(_conv(nf + gc, gc), lrelu)
        self.conv3 = nn.Sequential(_conv(nf + 2 * gc, gc), lrelu)
        self.conv4 = nn.Sequential(_conv(nf + 3 * gc, gc), lrelu)
        self.conv5 = nn.Sequential(_conv(nf + 4 * gc, nf))

    def forward(self, x: Tensor) -> Tensor:  # [B, nf, h, w]
        x1 = self.conv1(x)  # [B, gc, h, w]
        x2 = self.conv2(torch.cat((x, x1), 1))
        if self.conv1x1 is not None:
            x2 = x2 + self.conv1x1(x)
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        if self.conv1x1 is not None:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # [B, nf, h, w]
        return x5 * self.residual_scale + x


class RRDB(nn.Module):
    """Three dense blocks in a row, their result scaled by ``residual_scale`` and added to the input."""

    residual_scale: float = 0.2

    def __init__(self, nf: int, gc: int, plus: bool = False) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc, plus)
        self.RDB2 = ResidualDenseBlock(nf, gc, plus)
        self.RDB3 = ResidualDenseBlock(nf, gc, plus)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * self.residual_scale + x


class ShortcutBlock(nn.Module):
    """``x + sub(x)``: the trunk's long skip (the old layout's ``model.1.sub``)."""

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sub(x)


class RRDBNet(nn.Module):
    """ESRGAN's generator in the old layout: ``model`` is one flat ``Sequential``::

        model.0            conv in_nc -> nf
        model.1.sub.0..nb-1  RRDB blocks; model.1.sub.nb  conv nf -> nf (the trunk, added to model.0's output)
        model.2, 3, 4      nearest x2 upsample, conv, LeakyReLU        (once per upsampling stage)
        model.3u+2, 3u+3   conv, LeakyReLU                             (u = the number of stages)
        model.3u+4         conv nf -> out_nc

    Input and output in [0, 1], RGB, ``[B, C, H, W]`` -> ``[B, C, H * scale, W * scale]``.
    """

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        trunk = [RRDB(c.nf, c.gc, c.plus) for _ in range(c.nb)]
        layers: list[nn.Module] = [_conv(c.in_nc, c.nf), ShortcutBlock(nn.Sequential(*trunk, _conv(c.nf, c.nf)))]
        for _ in range(c.upsamples):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c.nf, c.nf), nn.LeakyReLU(0.2, True)]
        layers += [_conv(c.nf, c.nf), nn.LeakyReLU(0.2, True), _conv(c.nf, c.out_nc)]
        self.model = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W]
        s = self.config.shuffle
        if s == 1:
            return self.model(x)
        h, w = x.shape[-2:]
        # Real-ESRGAN pads the bottom and right by reflection to a multiple of the factor, and crops after
        x = F.pad(x, (0, -w % s, 0, -h % s), mode="reflect")
        out = self.model(F.pixel_unshuffle(x, s))  # [B, C * s^2, H / s, W / s] in
        return out[..., : h * self.scale, : w * self.scale]


def is_rrdb(state: StateDict) -> bool:
    old = "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state
    real_esrgan = {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"}
    bsrgan = {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"}
    return old or real_esrgan <= state.keys() or bsrgan <= state.keys()


_NEW_BLOCK = re.compile(r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)([123])\.(conv[1-5]|conv1x1)\.(weight|bias)")
_NEW_UP = re.compile(r"(?:conv_up|upconv)(\d+)\.(weight|bias)")


def rrdb_old_layout(state: StateDict) -> dict[str, Tensor]:
    """Real-ESRGAN's and BSRGAN's ``RRDBNet`` keys renamed to the old ESRGAN layout (unchanged if already
    in it). Upsampling conv ``n`` (1-based) is ``model.3n``; the two convs after them follow."""
    if "model.0.weight" in state:
        return dict(state)
    ups = sorted({int(m.group(1)) for k in state if (m := _NEW_UP.fullmatch(k))})
    if ups != list(range(1, len(ups) + 1)):
        raise SdStudioError(f"its upsampling convs are numbered {ups}; expected 1, 2, ...")
    blocks = {int(m.group(1)) for k in state if (m := _NEW_BLOCK.fullmatch(k))}
    nb, u = len(blocks), len(ups)
    renamed = {
        "conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "trunk_conv": f"model.1.sub.{nb}",
        "conv_hr": f"model.{3 * u + 2}", "HRconv": f"model.{3 * u + 2}", "conv_last": f"model.{3 * u + 4}",
    }  # fmt: skip
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if m := _NEW_BLOCK.fullmatch(key):
            block, rdb, conv, kind = m.groups()
            inner = "" if conv == "conv1x1" else ".0"
            out[f"model.1.sub.{block}.RDB{rdb}.{conv}{inner}.{kind}"] = tensor
        elif m := _NEW_UP.fullmatch(key):
            out[f"model.{3 * int(m.group(1))}.{m.group(2)}"] = tensor
        elif (name := key.rpartition(".")[0]) in renamed:
            out[f"{renamed[name]}.{key.rpartition('.')[2]}"] = tensor
        else:
            raise SdStudioError(f"unexpected key {key!r} for Real-ESRGAN's RRDBNet layout")
    return out


def _indices(state: StateDict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.fullmatch(k))})


def _shape(state: StateDict, key: str, ndim: int) -> tuple[int, ...]:
    t = state.get(key)
    if t is None:
        raise SdStudioError(f"missing tensor {key!r}")
    if t.ndim != ndim:
        raise SdStudioError(f"tensor {key!r} has shape {list(t.shape)}; expected {ndim} dimensions")
    return tuple(t.shape)


def rrdb_config(state: StateDict) -> RRDBConfig:
    """The ``RRDBConfig`` of an old-layout state dict (see :func:`rrdb_old_layout`)."""
    nf, in_nc = _shape(state, "model.0.weight", 4)[:2]
    blocks = _indices(state, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
    if not blocks or blocks != list(range(len(blocks))):
        raise SdStudioError(f"its RRDB blocks are numbered {blocks[:5]}...; expected 0, 1, 2, ...")
    nb = len(blocks)
    _shape(state, f"model.1.sub.{nb}.weight", 4)  # the trunk's last conv
    gc = _shape(state, "model.1.sub.0.RDB1.conv1.0.weight", 4)[0]
    # convs after the trunk: model.3, 6, ... (upsampling), then model.3u+2 and model.3u+4
    tail = _indices(state, r"model\.(\d+)\.weight")[1:]
    u = len(tail) - 2
    expected = [3 * i for i in range(1, u + 1)] + [3 * u + 2, 3 * u + 4]
    if u < 0 or tail != expected:
        found = ", ".join(f"model.{i}" for i in tail) or "none"
        raise SdStudioError(
            f"its convs after the trunk are {found}; ESRGAN's layout with nearest x2 upsampling has model.3, "
            "model.6, ... then two more (pixel-shuffle and x3 ESRGANs are not supported)"
        )
    out_nc = _shape(state, f"model.{3 * u + 4}.weight", 4)[0]
    shuffle = next((s for s in (2, 4) if in_nc == out_nc * s * s), 1)
    if 2**u % shuffle:
        raise SdStudioError(f"{in_nc} input channels (pixel-unshuffle {shuffle}) with only {u} x2 stages")
    plus = "model.1.sub.0.RDB1.conv1x1.weight" in state
    return RRDBConfig(in_nc, out_nc, nf, nb, gc, u, shuffle, plus)


# -------------------------------------------------------------------------------------- Real-ESRGAN Compact


@dataclass(frozen=True)
class CompactConfig:
    in_nc: int = 3
    out_nc: int = 3
    nf: int = 64
    num_conv: int = 16  # convs between the first and the last
    scale: int = 4

    @property
    def image_channels(self) -> int:
        return self.in_nc

    @property
    def align(self) -> int:
        return 1

    def describe(self) -> str:
        return f"Real-ESRGAN Compact x{self.scale} ({self.nf}nf, {self.num_conv}nc)"


class SRVGGNetCompact(nn.Module):
    """``body``: conv in_nc -> nf, PReLU, ``num_conv`` x (conv nf -> nf, PReLU), conv nf -> out_nc * scale^2;
    then a pixel shuffle, plus the nearest-upsampled input (the net learns the residual)."""

    def __init__(self, config: CompactConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        body: list[nn.Module] = [_conv(c.in_nc, c.nf), nn.PReLU(c.nf)]
        for _ in range(c.num_conv):
            body += [_conv(c.nf, c.nf), nn.PReLU(c.nf)]
        body.append(_conv(c.nf, c.out_nc * c.scale**2))
        self.body = nn.ModuleList(body)
        self.upsampler = nn.PixelShuffle(c.scale)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W]
        out = x
        for layer in self.body:
            out = layer(out)  # last: [B, C * scale^2, H, W]
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


def is_compact(state: StateDict) -> bool:
    return "body.0.weight" in state and "body.1.weight" in state


def compact_config(state: StateDict) -> CompactConfig:
    nf, in_nc = _shape(state, "body.0.weight", 4)[:2]
    layers = _indices(state, r"body\.(\d+)\.weight")
    last = layers[-1]
    if layers != list(range(last + 1)) or last % 2:
        raise SdStudioError(
            f"its body layers are {layers[:6]}...; Real-ESRGAN Compact has convs at even indices and PReLUs "
            "(weights of one value per channel) at odd ones"
        )
    for i in range(1, last, 2):
        if _shape(state, f"body.{i}.weight", 1) != (nf,):
            raise SdStudioError(f"body.{i}.weight is not a PReLU of {nf} channels")
    out = _shape(state, f"body.{last}.weight", 4)[0]  # out_nc * scale^2
    # the residual adds the upsampled input to the output: as many channels out as in
    scale = math.isqrt(out // in_nc) if out % in_nc == 0 else 0
    if scale < 1 or scale * scale * in_nc != out:
        raise SdStudioError(f"its last conv has {out} channels, not {in_nc} x a square scale factor")
    return CompactConfig(in_nc, in_nc, nf, (last - 2) // 2, scale)


# ----------------------------------------------------------------------------------------- other files

# A distinctive key of architectures AUTOMATIC1111 / ComfyUI run through spandrel but this module does not,
# and of files that are not upscalers at all: named in the refusal so the user knows what they hold.
_KNOWN_KEYS: tuple[tuple[str, str], ...] = (
    ("layers.0.residual_group.td", "ATD"),
    ("relative_position_index_SA", "HAT"),
    ("layers.0.residual_group.blocks.0.attn.logit_scale", "Swin2SR"),
    ("layers.0.residual_group.blocks.0.attn.relative_position_index", "SwinIR"),
    ("layers.0.swin1.norm1.weight", "DRCT"),
    ("layers.0.blocks.0.ffn.sg.conv.weight", "DAT"),
    ("layers.0.blocks.0.attn.attns.0.rpe_biases", "RGT"),
    ("unet1.conv1.conv.0.weight", "Real-CUGAN"),
    ("block_1.c1_r.sk.weight", "SPAN"),
    ("residual_layer.0.residual_layer.0.layer.0.fn.0.weight", "OmniSR"),
    ("m_head.0.weight", "SCUNet"),
    ("feats.1.refine.weight", "PLKSR"),
    ("feats.0.safm.aggr.weight", "SAFMN"),
    ("stylegan_decoder.style_mlp.1.weight", "GFPGAN (a face restorer)"),
    ("model.diffusion_model.input_blocks.0.0.weight", "a Stable Diffusion checkpoint"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE"),
)


# sdstudio.upscale.hat / .swinir / .dat run these: named only when a file's keys are incomplete
_RUN_HERE = ("HAT", "SwinIR", "DAT")


def describe_unknown(state: StateDict) -> str:
    """What a state dict that is no supported upscaler looks like, for a one-line refusal."""
    for key, name in _KNOWN_KEYS:
        if key in state:
            if name in _RUN_HERE:  # the architecture is supported, the file is not a whole one
                return f"it has {name}'s key {key!r} but not the rest of a {name} network (a truncated file?)"
            return f"its keys are those of {name} (e.g. {key!r})"
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in state):
        return "its keys are those of a LoRA"
    if "body.0.weight" in state:
        return "it has body.0.weight but no PReLU body.1.weight (a Compact net with another activation?)"
    first = ", ".join(repr(k) for k in sorted(state)[:3])
    return f"its {len(state)} tensors start {first}" if state else "it holds no tensors"
