"""The Inception-v3 network of FID (Heusel et al. 2017), as the TensorFlow graph ``2015-12-05`` that the
original FID code (TTUR) runs, in our own code.

Module names equal the keys of ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) and of
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, so loading is ``load_state_dict``. The
blocks follow torchvision's Inception-v3 with the TF graph's differences (pytorch-fid's ``FIDInception*``,
torch-fidelity's ``feature_extractor_inceptionv3.py``): average pools that do not count padding, and a
max pool in the last block's pool branch.

Input handling follows torch-fidelity, not pytorch-fid: uint8 RGB is resized to 299x299 by TensorFlow
1.x's bilinear resize (``align_corners=False``, no half-pixel centres), then mapped by
``(x - 128) / 128``. That is what the TF graph does, so features (and FIDs) match the original TTUR
figures that papers quote. pytorch-fid instead resizes with ``F.interpolate(bilinear,
align_corners=False)`` (half-pixel centres) after mapping to [0, 1], then maps ``2x - 1``; its FIDs differ
from TTUR's slightly (and its normalisation differs even at 299x299).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdstudio.errors import SdStudioError

INPUT_SIZE = 299
FEATURE_DIM = 2048


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: output pixel ``i`` samples input coordinate
    ``i * in / out`` (no half-pixel offset), clamped at the last row/column. [B, C, H, W] float."""
    out_h, out_w = size

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 coordinates, as TF computes them (and torch-fidelity's bit-exact CPU path)
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(n_in / n_out)
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (pos - lo.float()).to(x.dtype)

    y_lo, y_hi, dy = axis(x.shape[2], out_h)
    x_lo, x_hi, dx = axis(x.shape[3], out_w)
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)  # [B, C, out_h, W]
    tl, tr = top.index_select(3, x_lo), top.index_select(3, x_hi)
    bl, br = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    upper = tl + (tr - tl) * dx
    lower = bl + (br - bl) * dx
    return upper + (lower - upper) * dy[:, None]


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] RGB -> float32 [B, 3, 299, 299] in [-1, 1), as the TF FID graph does."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B, 3, H, W] RGB images, got {images.dtype} {tuple(images.shape)}")
    x = resize_bilinear_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE))
    return (x - 128) / 128


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TF's average pool ignores the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e): factorised 7x7 convolutions."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):  # fmt: skip
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c). ``max_pool``: the TF graph's Mixed_7c pools by max, not average
    (pytorch-fid's ``FIDInceptionE_2``)."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FidInceptionV3(nn.Module):
    """uint8 RGB images of any size -> the 2048-d pool features FID, KID and precision/recall use."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's logits (1008 classes); unused by FID, kept for loading

    def pool_features(self, x: Tensor) -> Tensor:
        """Preprocessed [B, 3, 299, 299] in [-1, 1] -> [B, 2048]."""
        x = self.Conv2d_1a_3x3(x)  # [B, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [B, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [B, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [B, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [B, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            x = block(x)  # [B, 256 | 288 | 288, 35, 35]
        x = self.Mixed_6a(x)  # [B, 768, 17, 17]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # [B, 768, 17, 17]
        x = self.Mixed_7a(x)  # [B, 1280, 8, 8]
        x = self.Mixed_7b(x)  # [B, 2048, 8, 8]
        x = self.Mixed_7c(x)  # [B, 2048, 8, 8]
        return x.mean(dim=(2, 3))  # [B, 2048]

    def forward(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] RGB -> float32 [B, 2048]."""
        return self.pool_features(preprocess(images)).float()


def load_inception(path: str | os.PathLike) -> FidInceptionV3:
    """The FID Inception from ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth``, in eval mode, fp32, without gradients."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SdStudioError(f"{path}: no such Inception weights file") from None
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        # weights_only's own message runs to many lines and advises unsafe loading: leave it out
        detail = "holds more than plain tensors" if isinstance(e, pickle.UnpicklingError) else str(e)
        raise SdStudioError(
            f"{path}: not a PyTorch weights file ({type(e).__name__}: {detail[:200]})"
        ) from None
    model = FidInceptionV3()
    load_inception_state(model, state, str(path))
    return model.eval().requires_grad_(False)


def load_inception_state(model: FidInceptionV3, state: object, name: str = "state dict") -> None:
    """Load ``state`` into ``model`` after checking that it is the FID Inception's (keys and shapes);
    BatchNorm's ``num_batches_tracked`` counters may be absent."""
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SdStudioError(
            f"{name}: not a state dict of tensors; expected pt_inception-2015-12-05-6726825d.pth"
        )
    expected = model.state_dict()
    needed = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SdStudioError(
            f"{name}: not the FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth): "
            f"{len(missing)} keys missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    wrong = [k for k in state if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise SdStudioError(f"{name}: {k} has shape {tuple(state[k].shape)}, the FID Inception-v3 has "
                            f"{tuple(expected[k].shape)}")  # fmt: skip
    model.load_state_dict(
        {**expected, **{k: v.float() if v.is_floating_point() else v for k, v in state.items()}}
    )
