"""Learned upscalers: our ESRGAN (both key layouts, x1 to x8, pixel-unshuffle x2), Real-ESRGAN Compact and
SwinIR (its four reconstructions, 1conv / 3conv, shifted windows, the JPEG models' range), HAT, DAT, SPAN and RealPLKSR against spandrel's own architecture classes and detection (the library ComfyUI and AUTOMATIC1111 run these
files through), tiled == untiled away from seams, seams blended, AUTOMATIC1111's sizing rules, and the
``sdstudio upscale`` command with its one-line refusals."""

import argparse
import importlib
import importlib.util
import itertools
import math
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sdstudio.cli import run
from sdstudio.cli_upscale import add_upscale_parser
from sdstudio.errors import CheckpointError, SdStudioError
from sdstudio.upscale import (
    ModelUpscaler,
    ResampleUpscaler,
    Tiling,
    UpscalerRef,
    find_upscaler,
    load_upscaler,
    upscaler_library,
    upscaler_names,
)
from sdstudio.upscale.arches import (
    RRDB,
    CompactConfig,
    ResidualDenseBlock,
    RRDBConfig,
    RRDBNet,
    SRVGGNetCompact,
    rrdb_config,
    rrdb_old_layout,
)
from sdstudio.upscale.dat import DAT, AdaptiveSpatialAttention
from sdstudio.upscale.hat import HAB, HAT, OCAB, HATConfig
from sdstudio.upscale.load import build_upscaler_model
from sdstudio.upscale.span import SPAN, SPANConfig
from sdstudio.upscale.swinir import DIV2K_MEAN, SwinIR, SwinIRConfig, SwinTransformerBlock
from sdstudio.upscale.tiling import tile_spans, upscale_tiled

ATOL = 1e-5  # float32, the same convolutions in the same order: only kernel choice differs by shape


# spandrel's package __init__ builds its registry of every architecture, and two of them (LaMa, RestoreFormer)
# import torchvision, which has no CPU build for our torch on this project's package index: `import spandrel`
# fails. The ESRGAN and Compact modules themselves need only torch, typing_extensions, spandrel.util and
# spandrel.__helpers. So a bare module whose __path__ is the installed spandrel folder stands in for the
# package: Python's import system then finds and runs the submodules as usual, never the package __init__.
# sys.modules is put back afterwards; the classes keep working (their modules hold what they imported).
@pytest.fixture(scope="module")
def spandrel() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("spandrel")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("spandrel is not installed; it is a test dependency: pip install --no-deps spandrel==0.4.2")
    ours = lambda name: name == "spandrel" or name.startswith("spandrel.")
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    stand_in = types.ModuleType("spandrel")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["spandrel"] = stand_in
    try:
        esrgan = importlib.import_module("spandrel.architectures.ESRGAN")
        compact = importlib.import_module("spandrel.architectures.Compact")
        swinir = importlib.import_module("spandrel.architectures.SwinIR")
        hat = importlib.import_module("spandrel.architectures.HAT")
        dat = importlib.import_module("spandrel.architectures.DAT")
        span = importlib.import_module("spandrel.architectures.SPAN")
        plksr = importlib.import_module("spandrel.architectures.PLKSR")
    finally:
        for name in [k for k in sys.modules if ours(k)]:
            del sys.modules[name]
        sys.modules.update(saved)
    return types.SimpleNamespace(
        ESRGAN=esrgan.ESRGAN, ESRGANArch=esrgan.ESRGANArch, Compact=compact.Compact, CompactArch=compact.CompactArch,
        SwinIR=swinir.SwinIR, SwinIRArch=swinir.SwinIRArch, HAT=hat.HAT, HATArch=hat.HATArch,
        DAT=dat.DAT, DATArch=dat.DATArch, SPAN=span.SPAN, SPANArch=span.SPANArch,
        RealPLKSR=plksr.RealPLKSR, PLKSRArch=plksr.PLKSRArch,
    )  # fmt: skip


def assert_same(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == want.shape
    assert want.abs().max() > 0.05  # not a degenerate, all-zero comparison
    err = (got - want).abs().max().item()
    assert err < ATOL, f"max |ours - spandrel| = {err:.3g}"


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a typical trained size: convs ~ N(0, 1 / fan_in), biases and PReLU slopes random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
    return model.eval()


def image(h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- ESRGAN parity


@pytest.mark.parametrize("scale", [4, 2, 8, 1])
@pytest.mark.parametrize("plus", [False, True], ids=["esrgan", "esrgan+"])
def test_old_layout_matches_spandrel(spandrel, scale, plus):
    ref = randomize_(spandrel.ESRGAN(num_filters=16, num_blocks=2, scale=scale, plus=plus), seed=scale)
    state = ref.state_dict()
    ours, config = build_upscaler_model(state)
    assert config == RRDBConfig(3, 3, 16, 2, 32, int(math.log2(scale)), 1, plus)
    assert_same(ours, ref, image(13, 11))
    # spandrel's detection on the same state dict reads the same hyperparameters
    found = spandrel.ESRGANArch().load(dict(state))
    hp = found.model.hyperparameters
    assert (hp["num_filters"], hp["num_blocks"], hp["plus"], found.scale) == (16, 2, plus, config.scale)


def real_esrgan_state(scale: int, nf: int = 16, nb: int = 2, gc: int = 32, seed: int = 0) -> dict:
    """Random weights under Real-ESRGAN's key names (BasicSR ``archs/rrdbnet_arch.py`` ``RRDBNet``: scale 2
    and 1 pixel-unshuffle the input by 2 and 4, then always upsample x4 with conv_up1 and conv_up2)."""
    g = torch.Generator().manual_seed(seed)
    in_nc = 3 * {4: 1, 2: 4, 1: 16}[scale]
    shapes = {"conv_first": (nf, in_nc)}
    for i in range(nb):
        for r in (1, 2, 3):
            for k in range(1, 6):
                shapes[f"body.{i}.rdb{r}.conv{k}"] = (nf if k == 5 else gc, nf + (k - 1) * gc)
    shapes |= {"conv_body": (nf, nf), "conv_up1": (nf, nf), "conv_up2": (nf, nf), "conv_hr": (nf, nf)}
    shapes["conv_last"] = (3, nf)
    state = {}
    for name, (o, i) in shapes.items():
        state[f"{name}.weight"] = torch.randn(o, i, 3, 3, generator=g) / math.sqrt(9 * i)
        state[f"{name}.bias"] = torch.rand(o, generator=g) * 0.1
    return state


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_real_esrgan_layout_matches_spandrel(spandrel, scale, tmp_path):
    state = real_esrgan_state(scale, seed=scale)
    found = spandrel.ESRGANArch().load(dict(state))  # spandrel's own renaming to the old layout
    ref = found.model.eval()
    # as Real-ESRGAN ships them: EMA weights under params_ema, the raw ones under params (not to be used)
    path = tmp_path / f"RealESRGAN_x{scale}plus.pth"
    torch.save({"params_ema": state, "params": real_esrgan_state(scale, seed=99)}, path)
    up = load_upscaler(path)
    assert up.name == f"RealESRGAN_x{scale}plus" and up.scale == scale == found.scale
    assert up.config.shuffle == (found.model.hyperparameters["shuffle_factor"] or 1)
    assert up.config.image_channels == found.input_channels == 3
    assert_same(up.model, ref, image(13, 11))  # odd sides: the unshuffle's reflection pad and crop


def test_bsrgan_layout_renames_like_real_esrgan():
    new = real_esrgan_state(4, nb=1, seed=3)
    bsrgan = {
        k.replace("body.0.rdb", "RRDB_trunk.0.RDB").replace("conv_body", "trunk_conv").replace("conv_up", "upconv")
        .replace("conv_hr", "HRconv"): v for k, v in new.items()
    }  # fmt: skip
    assert rrdb_old_layout(bsrgan).keys() == rrdb_old_layout(new).keys()
    assert all(torch.equal(rrdb_old_layout(bsrgan)[k], v) for k, v in rrdb_old_layout(new).items())


@pytest.mark.parametrize(
    "config",
    [RRDBConfig(nf=8, nb=3, gc=8), RRDBConfig(in_nc=12, nf=8, nb=1, gc=4, shuffle=2), RRDBConfig(upsamples=0, nb=1)],
)
def test_rrdb_config_is_read_back_from_its_own_state(config):
    assert rrdb_config(RRDBNet(config).state_dict()) == config


def test_a_missing_residual_scale_fails_parity(spandrel):
    """The parity check has teeth: the same weights with RRDB's 0.2 residual scale dropped do not pass."""
    ref = randomize_(spandrel.ESRGAN(num_filters=16, num_blocks=2, scale=4), seed=5)
    ours, _ = build_upscaler_model(ref.state_dict())
    x = image(12, 12)
    assert_same(ours, ref, x)
    for block in ours.modules():
        if isinstance(block, RRDB):
            block.residual_scale = 1.0  # an instance attribute: the class keeps 0.2
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)
    assert RRDB.residual_scale == ResidualDenseBlock.residual_scale == 0.2


# ------------------------------------------------------------------------------------- Compact parity


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_compact_matches_spandrel(spandrel, scale):
    ref = randomize_(spandrel.Compact(num_feat=16, num_conv=4, upscale=scale), seed=scale)
    state = ref.state_dict()
    ours, config = build_upscaler_model(state)
    assert config == CompactConfig(3, 3, 16, 4, scale)
    assert_same(ours, ref, image(13, 11))
    found = spandrel.CompactArch().load(dict(state))
    hp = found.model.hyperparameters
    assert (hp["num_feat"], hp["num_conv"], hp["upscale"], hp["num_out_ch"]) == (16, 4, scale, 3)


# ------------------------------------------------------------------------------------- SwinIR parity


def randomize_swin_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of a trained net's scale: convs and linears ~ N(0, 1 / fan_in), LayerNorm scales near 1, a
    relative-position bias of a few units (so that which window a token is in matters), random biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


SWINIR_CASES = {
    # name: spandrel's SwinIR arguments (small widths; the official files' structure)
    "classical x2": {"upscale": 2, "upsampler": "pixelshuffle", "resi_connection": "1conv"},
    "classical x3": {"upscale": 3, "upsampler": "pixelshuffle", "resi_connection": "1conv"},
    "lightweight x4 3conv": {"upscale": 4, "upsampler": "pixelshuffledirect", "resi_connection": "3conv"},
    "real-world x4": {"upscale": 4, "upsampler": "nearest+conv", "resi_connection": "1conv"},
    "real-world x2 unshuffled": {"upscale": 4, "upsampler": "nearest+conv", "start_unshuffle": 2},
    "denoise gray": {"upscale": 1, "upsampler": "", "in_chans": 1},
    "jpeg window 7": {"upscale": 1, "upsampler": "", "window_size": 7, "img_size": 14, "img_range": 255.0},
}


def swinir_reference(spandrel, name: str, seed: int = 0):
    kw = {"img_size": 16, "embed_dim": 16, "depths": [2, 3], "num_heads": [2, 4], "window_size": 4, "mlp_ratio": 2.0}
    return randomize_swin_(spandrel.SwinIR(**(kw | SWINIR_CASES[name])), seed=seed)


@pytest.mark.parametrize("name", list(SWINIR_CASES))
def test_swinir_matches_spandrel(spandrel, name):
    ref = swinir_reference(spandrel, name, seed=len(name))
    state = ref.state_dict()  # with the reference's buffers: relative_position_index, attn_mask
    assert any(k.endswith("attn_mask") for k in state)
    case = SWINIR_CASES[name]
    unshuffle = case.get("start_unshuffle", 1)
    if unshuffle > 1:  # files keep the unshuffle in conv_first: Sequential(PixelUnshuffle, Conv2d)
        state = {k.replace("conv_first.", "conv_first.1."): v for k, v in state.items()}
    ours, config = build_upscaler_model(state)
    assert isinstance(ours, SwinIR) and config.scale == case["upscale"] // unshuffle
    assert (config.depths, config.num_heads, config.embed_dim) == ((2, 3), (2, 4), 16)
    assert (config.window_size, config.upsampler, config.img_range) == (
        case.get("window_size", 4), case["upsampler"], case.get("img_range", 1.0))  # fmt: skip
    # spandrel's own detection reads the same from the same keys
    found = spandrel.SwinIRArch().load(dict(state))
    hp = found.model.hyperparameters
    assert (found.scale, hp["embed_dim"], hp["window_size"], hp["resi_connection"], hp["img_size"]) == (
        config.scale, 16, config.window_size, config.resi_connection, config.img_size)  # fmt: skip
    # odd sides (reflection padding to the window and the crop), and the training size (the stored mask)
    for size in ((17, 13), (16, 16)) if unshuffle == 1 else ((16, 24),):
        assert_same(ours, ref, image(*size, c=config.in_chans, seed=size[0]))


def test_swinir_parity_has_teeth(spandrel):
    """Unshifted windows, or no relative-position bias, do not pass against the same weights."""
    ref = swinir_reference(spandrel, "classical x2", seed=3)
    ours, _ = build_upscaler_model(ref.state_dict())
    x = image(16, 16)
    assert_same(ours, ref, x)
    blocks = [m for m in ours.modules() if isinstance(m, SwinTransformerBlock)]
    shifts = [b.shift for b in blocks]
    assert shifts == [0, 2, 0, 2, 0]
    for b in blocks:
        b.shift = 0
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)
    for b, s in zip(blocks, shifts):
        b.shift = s
    assert_same(ours, ref, x)
    with torch.no_grad():
        for b in blocks:
            b.attn.relative_position_bias_table.zero_()
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)


def test_swinir_file_loads_by_a1111_name(spandrel, tmp_path):
    ref = swinir_reference(spandrel, "real-world x4", seed=4)
    stem = "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN"
    torch.save({"params_ema": ref.state_dict()}, tmp_path / f"{stem}.pth")  # as the release ships it
    found = find_upscaler("SwinIR 4x", upscaler_library([tmp_path]))
    up = load_upscaler(found.path, name=found.name)
    assert up.name == "SwinIR 4x" and up.scale == 4 and "SwinIR x4 (real-world" in repr(up)
    assert_same(up.model, ref, image(9, 14))


def test_swin2sr_is_named_not_run(tmp_path):
    state = dict(SwinIR(SwinIRConfig(embed_dim=8, depths=(1,), num_heads=(2,), mlp_hidden=8)).state_dict())
    state["layers.0.residual_group.blocks.0.attn.logit_scale"] = torch.zeros(2, 1, 1)
    path = tmp_path / "4x-Swin2SR.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match="keys are those of Swin2SR"):
        load_upscaler(path)


# ------------------------------------------------------------------------------------- HAT parity

HAT_CASES = {
    "x4": {"upscale": 4},
    "x2 identity": {"upscale": 2, "resi_connection": "identity"},
    "x3 gray": {"upscale": 3, "in_chans": 1},
    "x2 overlap 0.25": {"upscale": 2, "overlap_ratio": 0.25, "window_size": 8},
}


def hat_reference(spandrel, name: str, seed: int = 0):
    kw = {"img_size": 16, "embed_dim": 16, "depths": (2, 3), "num_heads": (2, 4), "window_size": 4,
          "compress_ratio": 2, "squeeze_factor": 4, "mlp_ratio": 2.0}  # fmt: skip
    return randomize_swin_(spandrel.HAT(**(kw | HAT_CASES[name])), seed=seed)


@pytest.mark.parametrize("name", list(HAT_CASES))
def test_hat_matches_spandrel(spandrel, name):
    ref = hat_reference(spandrel, name, seed=len(name))
    state = ref.state_dict()  # with relative_position_index_SA / _OCA
    ours, config = build_upscaler_model(state)
    case = HAT_CASES[name]
    assert isinstance(ours, HAT) and config.scale == case["upscale"]
    window = case.get("window_size", 4)
    assert (config.window_size, config.overlap_window) == (window, window + int(window * case.get("overlap_ratio", 0.5)))
    assert (config.depths, config.num_heads, config.cab_hidden, config.squeeze_hidden) == ((2, 3), (2, 4), 8, 4)
    found = spandrel.HATArch().load(dict(state))
    assert (found.scale, found.model.hyperparameters["window_size"]) == (config.scale, window)
    for size in ((17, 13), (16, 24)):
        assert_same(ours, ref, image(*size, c=config.in_chans, seed=size[0]))


def test_hat_parity_has_teeth(spandrel):
    """Without the convolutional branch, or with the cross-attention's keys from the inner window only,
    the same weights do not pass."""
    ref = hat_reference(spandrel, "x4", seed=5)
    ours, _ = build_upscaler_model(ref.state_dict())
    x = image(16, 16)
    assert_same(ours, ref, x)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, HAB):
                m.conv_block.cab[2].weight.mul_(0)
                m.conv_block.cab[2].bias.mul_(0)
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)
    ours, _ = build_upscaler_model(ref.state_dict())
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, OCAB):
                m.relative_position_bias_table.zero_()
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)


def test_hat_is_named_in_its_config():
    config = HATConfig(embed_dim=8, depths=(1,), num_heads=(2,), window_size=4, overlap_window=6, mlp_hidden=8,
                       cab_hidden=4, squeeze_hidden=2, upscale=2, num_feat=8)  # fmt: skip
    model = HAT(config)
    _, read = build_upscaler_model(model.state_dict())
    assert read == config and read.describe().startswith("HAT x2 (8 dim")


# ------------------------------------------------------------------------------------- DAT parity

DAT_CASES = {
    # 5 blocks in group 0 (spatial blocks 0, 2, 4: block 2 shifted) and 1 in group 1 (block 0 shifted)
    "x2 windows 2x4": {"upscale": 2, "split_size": [2, 4]},
    "x4 3conv windows 4x8": {"upscale": 4, "split_size": [4, 8], "resi_connection": "3conv"},
    "x3 gray": {"upscale": 3, "in_chans": 1, "split_size": [2, 4]},
    "x4 light": {"upscale": 4, "upsampler": "pixelshuffledirect", "split_size": [4, 4], "qkv_bias": False},
}


def randomize_bn_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Running statistics as a trained net has them (BatchNorm in eval mode uses them, not the batch's)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def dat_reference(spandrel, name: str, seed: int = 0):
    kw = {"img_size": 16, "embed_dim": 32, "depth": [5, 1], "num_heads": [4, 2], "expansion_factor": 2.0}
    return randomize_bn_(randomize_swin_(spandrel.DAT(**(kw | DAT_CASES[name])), seed=seed), seed)


@pytest.mark.parametrize("name", list(DAT_CASES))
def test_dat_matches_spandrel(spandrel, name):
    ref = dat_reference(spandrel, name, seed=len(name))
    state = ref.state_dict()  # with rpe_biases, relative_position_index, attn_mask_0 / _1
    ours, config = build_upscaler_model(state)
    case = DAT_CASES[name]
    assert isinstance(ours, DAT) and config.scale == case["upscale"]
    assert (config.split_size, config.depths, config.num_heads) == (tuple(case["split_size"]), (5, 1), (4, 2))
    assert [m.shift for m in ours.modules() if isinstance(m, AdaptiveSpatialAttention)] == [False, True, False, True]
    found = spandrel.DATArch().load(dict(state))
    assert (found.scale, found.model.hyperparameters["split_size"]) == (config.scale, list(config.split_size))
    for size in ((17, 13), (16, 16)):  # padded windows (zeros after the projection) and whole ones
        assert_same(ours, ref, image(*size, c=config.in_chans, seed=size[0]))


def test_dat_parity_has_teeth(spandrel):
    """Unshifted windows, or the two halves' windows not transposed, do not pass against the same weights."""
    ref = dat_reference(spandrel, "x2 windows 2x4", seed=7)
    x = image(16, 16)
    ours, _ = build_upscaler_model(ref.state_dict())
    assert_same(ours, ref, x)
    for m in ours.modules():
        if isinstance(m, AdaptiveSpatialAttention):
            m.shift = False
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)
    ours, _ = build_upscaler_model(ref.state_dict())
    for m in ours.modules():
        if isinstance(m, AdaptiveSpatialAttention):
            m.attns[1].size = m.attns[0].size  # both halves in 2x4 windows (their bias index is 8x8 either way)
            m.sizes = (m.sizes[0], m.sizes[0])
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)


# ------------------------------------------------------------------------------------- SPAN parity


@pytest.mark.parametrize("scale, norm", [(4, True), (2, False), (1, True)])
def test_span_matches_spandrel(spandrel, scale, norm):
    """Against spandrel's SPAN in eval mode, which recomputes each 3x3 conv from its trained branches: the
    files' own eval_conv weights are stale on purpose here (random), and must not matter. In float64: with
    random weights the 255-scaled input goes through six self-gating blocks that magnify float32 rounding
    (the fused kernels' summation order) a thousandfold; the reference's mean is float32-rounded, so it gets
    the exact one the float64 comparison needs."""
    ref = spandrel.SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=scale, norm=norm)
    ref = randomize_(ref, seed=scale).eval()
    state = ref.state_dict()
    ours, config = build_upscaler_model(state)
    assert isinstance(ours, SPAN) and (config.scale, config.feature_channels, config.norm) == (scale, 8, norm)
    found = spandrel.SPANArch().load(dict(state))
    assert found.scale == scale
    # the file's 3x3 kernels are not the fused branches: a model that ran them would fail below
    assert (state["block_3.c2_r.eval_conv.weight"] - ours.block_3.c2_r.fused()[0]).abs().max() > 0.1
    ref.double().mean = torch.tensor(DIV2K_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    x = image(13, 11).double()
    with torch.no_grad():
        want, got = ref(x), ours.double()(x)
    assert want.abs().max() > 0.05 and got.shape == want.shape
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-10, f"max |ours - spandrel| / max |spandrel| = {err:.3g}"


# ------------------------------------------------------------------------------------- RealPLKSR parity


@pytest.mark.parametrize(
    "kw",
    [
        {"upscaling_factor": 4},
        {"upscaling_factor": 2, "dysample": True},
        {"upscaling_factor": 3, "dysample": True, "layer_norm": True, "use_ea": False},
        {"upscaling_factor": 1, "dysample": True},
    ],
    ids=["x4", "x2 dysample", "x3 dysample layernorm no-ea", "x1 dysample"],
)
def test_realplksr_matches_spandrel(spandrel, kw):
    ref = spandrel.RealPLKSR(dim=16, n_blocks=3, kernel_size=7, split_ratio=0.25, **kw)
    ref = randomize_(ref, seed=kw["upscaling_factor"]).eval()
    with torch.no_grad():  # DySample's scope starts at zero: make its offsets count
        for name, p in ref.named_parameters():
            if "to_img.scope" in name or "to_img.offset" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    state = ref.state_dict()
    ours, config = build_upscaler_model(state)
    assert (config.scale, config.n_blocks, config.kernel_size, config.lk_channels) == (kw["upscaling_factor"], 3, 7, 4)
    assert (config.dysample, config.layer_norm, config.use_ea) == (
        kw.get("dysample", False), kw.get("layer_norm", False), kw.get("use_ea", True))  # fmt: skip
    found = spandrel.PLKSRArch().load(dict(state))
    assert found.scale == config.scale
    assert_same(ours, ref, image(13, 11))


def test_realplksr_parity_has_teeth(spandrel):
    """GroupNorms of 2 groups instead of the releases' 4, or DySample without its initial sub-pixel places,
    do not pass against the same weights."""
    ref = randomize_(spandrel.RealPLKSR(dim=16, n_blocks=3, kernel_size=7, upscaling_factor=2, dysample=True), 2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "to_img." in name and "end_conv" not in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    ours, _ = build_upscaler_model(ref.eval().state_dict())
    x = image(13, 11)
    assert_same(ours, ref, x)
    for block in ours.feats[1:4]:
        block.norm.num_groups = 2
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)
    ours, _ = build_upscaler_model(ref.state_dict())
    ours.to_img.init_pos.zero_()
    with pytest.raises(AssertionError, match="max"):
        assert_same(ours, ref, x)


# ------------------------------------------------------------------------------------- files


def test_safetensors_module_prefix_and_name(spandrel, tmp_path):
    ref = randomize_(spandrel.Compact(num_feat=8, num_conv=2, upscale=2), seed=7)
    path = tmp_path / "2x-Tiny.safetensors"
    save_file({f"module.{k}": v.half() for k, v in ref.state_dict().items()}, path)  # DataParallel, fp16
    up = load_upscaler(path)
    assert up.name == "2x-Tiny" and up.scale == 2 and up.dtype == torch.float32
    with torch.no_grad():
        want = ref.half().float()(image(9, 7))  # the file's fp16 weights, computed in float32
        assert (up.model(image(9, 7)) - want).abs().max() < ATOL


@pytest.mark.parametrize(
    "state, message",
    [
        ({"layers.0.residual_group.blocks.0.attn.relative_position_index": torch.zeros(4, dtype=torch.long),
          "conv_first.weight": torch.zeros(8, 3, 3, 3)}, "has SwinIR's key .* but not the rest of a SwinIR network"),
        ({"relative_position_index_SA": torch.zeros(4), "conv_first.weight": torch.zeros(8, 3, 3, 3)},
         "has HAT's key 'relative_position_index_SA' but not the rest"),
        ({"layers.0.blocks.0.ffn.sg.conv.weight": torch.zeros(4)}, "has DAT's key .* but not the rest"),
        ({"layers.0.blocks.0.attn.attns.0.rpe_biases": torch.zeros(4)}, "its keys are those of RGT"),
        ({"alpha": torch.zeros(1), "beta": torch.zeros(2)}, "its 2 tensors start 'alpha', 'beta'"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "a Stable Diffusion checkpoint"),
    ],
    ids=["swinir", "hat", "dat", "rgt", "unknown", "sd"],
)
def test_unknown_architectures_are_named(tmp_path, state, message):
    path = tmp_path / "thing.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match="not an upscaler sdstudio can run") as e:
        load_upscaler(path)
    text = str(e.value)
    assert text.startswith(str(path)) and re.search(message, text) and "\n" not in text


def test_malformed_esrgan_is_one_line(tmp_path):
    state = RRDBNet(RRDBConfig(nf=8, nb=2, gc=8)).state_dict()
    state["model.1.sub.1.RDB2.conv3.0.weight"] = torch.zeros(8, 20, 3, 3)  # reads nf + 2 gc = 24 channels
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"broken\.pth: its weights do not fit ESRGAN x4 \(8nf, 2nb, 8gc\): size mismatch") as e:
        load_upscaler(path)
    assert "\n" not in str(e.value)
    del state["model.1.sub.2.weight"]  # the trunk's last conv
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing tensor 'model.1.sub.2.weight'"):
        load_upscaler(path)


def test_names_are_found_in_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("4x-UltraSharp.pth", "sub/RealESRGAN_x4plus.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    library = upscaler_library([tmp_path])
    assert library.names == ["4x-UltraSharp", "RealESRGAN_x4plus"]
    assert upscaler_names(library) == ["Lanczos", "Nearest", "4x-UltraSharp", "RealESRGAN_x4plus"]
    assert find_upscaler("Lanczos", library) == UpscalerRef("Lanczos")
    real_esrgan = tmp_path / "sub/RealESRGAN_x4plus.pth"
    assert find_upscaler("RealESRGAN_x4plus", library) == UpscalerRef("RealESRGAN_x4plus", real_esrgan)
    # AUTOMATIC1111's name for that file (its infotexts' "Hires upscaler: R-ESRGAN 4x+") finds it, and stays
    assert find_upscaler("R-ESRGAN 4x+", library) == UpscalerRef("R-ESRGAN 4x+", real_esrgan)
    path = tmp_path / "4x-UltraSharp.pth"
    assert find_upscaler(str(path)) == UpscalerRef("4x-UltraSharp", path)
    with pytest.raises(SdStudioError, match=r"'4x-Ultra' not found in .*closest names: 4x-UltraSharp, .*"
                       r"built in: Lanczos, Nearest"):  # fmt: skip
        find_upscaler("4x-Ultra", library)
    with pytest.raises(SdStudioError, match=r"'R-ESRGAN 2x\+' not found .*\(A1111's name for RealESRGAN_x2plus\)"):
        find_upscaler("R-ESRGAN 2x+", library)
    with pytest.raises(SdStudioError, match=r"no upscaler folder given \(--upscaler-dir DIR\); built in"):
        find_upscaler("4x-UltraSharp")


# ------------------------------------------------------------------------------------- tiling


def a1111_split_grid_starts(length: int, tile: int, overlap: int) -> list[int]:
    """AUTOMATIC1111's ``images.split_grid`` tile positions along one side."""
    count = math.ceil((length - overlap) / (tile - overlap))
    dx = (length - tile) / (count - 1) if count > 1 else 0
    return [length - tile if int(i * dx) + tile >= length else int(i * dx) for i in range(count)]


@pytest.mark.parametrize("length, tile, overlap", [(500, 192, 8), (193, 192, 8), (1000, 64, 32), (77, 20, 3)])
def test_tiles_are_placed_as_a1111_places_them(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert [s for s, _ in spans] == a1111_split_grid_starts(length, tile, overlap)
    assert all(e - s == tile for s, e in spans) and spans[-1][1] == length


@pytest.mark.parametrize("length, tile, overlap, align", [(101, 40, 10, 2), (300, 64, 8, 4), (50, 64, 8, 2)])
def test_aligned_tiles_cover_and_overlap(length, tile, overlap, align):
    spans = tile_spans(length, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(s % align == 0 for s, _ in spans)
    assert all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def safe_positions(length: int, spans: list[tuple[int, int]], scale: int, radius: int) -> torch.Tensor:
    """Output positions along one side where every tile covering them is at least ``radius`` input pixels
    from its cut edges (image borders are no cut: the whole image is padded there too)."""
    safe = torch.ones(length * scale, dtype=torch.bool)
    for s, e in spans:
        p = torch.arange(s * scale, e * scale)
        far = torch.ones(len(p), dtype=torch.bool)
        if s > 0:
            far &= p - s * scale >= radius * scale
        if e < length:
            far &= e * scale - 1 - p >= radius * scale
        safe[p] &= far
    return safe


@pytest.mark.parametrize(
    "name, size, tiling, radius",
    [
        # 4 convs of 3x3 at the input's resolution: each output pixel sees 4 input pixels around it
        ("compact x4", (70, 90), Tiling(32, 12), 4),
        # conv_first + 3 x 5 convs + conv_body on the 2x-unshuffled grid (17 cells = 34 input pixels) and the
        # upsampling convs after it (< 3 input pixels): within 40; tiles cut at even starts only
        ("real-esrgan x2", (231, 249), Tiling(200, 90), 40),
        # SwinIR, window 4: tiles start on the window grid, so windows fall as on the whole image; 5 blocks
        # (each reaching half a window past its own when shifted) and 4 convs: within 24 input pixels
        ("swinir x2", (120, 110), Tiling(80, 40), 24),
        # SPAN: 21 convolutions of 3x3 at the input's resolution
        ("span x2", (120, 110), Tiling(80, 40), 21),
    ],
)
def test_tiled_equals_untiled_away_from_seams(name, size, tiling, radius):
    torch.manual_seed(0)
    if name.startswith("compact"):
        model = randomize_(SRVGGNetCompact(CompactConfig(nf=8, num_conv=2, scale=4)), seed=1)
    elif name.startswith("span"):
        model = randomize_(SPAN(SPANConfig(feature_channels=8, upscale=2, norm=False)), seed=1).eval()
    elif name.startswith("swinir"):
        config = SwinIRConfig(embed_dim=16, depths=(2, 3), num_heads=(2, 4), window_size=4, mlp_hidden=32,
                              upscale=2, num_feat=16, img_size=16)  # fmt: skip
        model = randomize_swin_(SwinIR(config), seed=1)
    else:
        model = randomize_(RRDBNet(RRDBConfig(in_nc=12, nf=8, nb=1, gc=8, shuffle=2)), seed=1)
    up = ModelUpscaler(name, model, model.config, tiling=tiling)
    x = image(*size, seed=2)
    with torch.no_grad():
        whole = model(x)
    tiled = up.upscale_tensor(x)
    spans = [tile_spans(n, tiling.size, tiling.overlap, model.config.align) for n in size]
    assert len(spans[0]) >= 2 and len(spans[1]) >= 2
    rows, cols = (safe_positions(n, s, up.scale, radius) for n, s in zip(size, spans))
    mask = rows[:, None] & cols[None, :]
    assert mask.float().mean() > 0.3  # a large part of the image, seams' centres included
    diff = (tiled - whole).abs()[0].amax(0)
    assert diff[mask].max() < ATOL, f"{diff[mask].max():.3g} away from seams"
    # near cut edges tiles see zero padding instead of their neighbours: close, not equal
    assert diff[~mask].max() > ATOL and diff.mean() < 0.01
    if name.startswith("swinir"):  # tiles off the window grid see other windows: different everywhere
        misaligned = upscale_tiled(model, x, up.scale, tiling, align=1)
        assert (misaligned - whole).abs()[0].amax(0)[mask].max() > 0.1


def test_seams_blend_linearly():
    """Each tile's output carries its own constant (its mean): across a band two tiles share, the result
    moves linearly from one constant to the other, with no step; elsewhere it is the tile's own."""
    scale, tiling = 2, Tiling(40, 16)
    x = image(6, 100, c=1, seed=3)

    def fn(t):
        return F.interpolate(t, scale_factor=scale, mode="nearest") + t.mean()

    offset = (upscale_tiled(fn, x, scale, tiling) - F.interpolate(x, scale_factor=scale, mode="nearest"))[0, 0, 0]
    spans = tile_spans(100, 40, 16)
    assert spans == [(0, 40), (20, 60), (40, 80), (60, 100)]
    c = [x[..., s:e].mean().item() for s, e in spans]
    expected = torch.empty(200)
    expected[:40] = c[0]
    for i in range(3):  # band [20 (i + 1), 20 (i + 2)) input pixels is shared by tiles i and i + 1
        t = (torch.arange(40) + 0.5) / 40
        expected[40 * (i + 1) : 40 * (i + 2)] = c[i] * (1 - t) + c[i + 1] * t
    expected[160:] = c[3]
    torch.testing.assert_close(offset, expected, atol=1e-6, rtol=0)
    steps = offset.diff().abs().max()
    assert steps <= max(abs(a - b) for a, b in itertools.pairwise(c)) / 40 + 1e-6  # a hard paste steps by |c_i - c_j|


def test_tiling_options_are_checked():
    with pytest.raises(SdStudioError, match=r"overlap \(8\) must be smaller than the tile size \(8\)"):
        Tiling(8, 8)
    assert tile_spans(100, 0, 8) == [(0, 100)]


# ------------------------------------------------------------------------------------- A1111's sizes


@pytest.fixture(scope="module")
def x2_upscaler():
    model = randomize_(SRVGGNetCompact(CompactConfig(nf=8, num_conv=2, scale=2)), seed=4)
    return ModelUpscaler("2x-Test", model, model.config, tiling=Tiling(0, 0))


def rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a_model_pass_is_rgb_in_0_1_rounded(x2_upscaler):
    im = rgb(9, 7)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = x2_upscaler.model(x)[0].clamp(0, 1)
    want = (y * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(x2_upscaler.step(im)), want)


def test_upscale_by_follows_a1111_extras(x2_upscaler):
    im = rgb(20, 16)
    # x4 with a x2 model: two passes land on the target exactly
    assert np.array_equal(np.asarray(x2_upscaler.upscale_by(im, 4)), np.asarray(x2_upscaler.step(x2_upscaler.step(im))))
    # x3: two passes (x2 is short of 60x48), then Lanczos down to the target, sides rounded down to 8s
    want = x2_upscaler.step(x2_upscaler.step(im)).resize((56, 48), Image.LANCZOS)
    assert np.array_equal(np.asarray(x2_upscaler.upscale_by(im, 3)), np.asarray(want))
    # Lanczos: resized by the factor, then to the multiple of 8
    im = rgb(100, 75)
    want = im.resize((200, 150), Image.LANCZOS).resize((200, 144), Image.LANCZOS)
    assert np.array_equal(np.asarray(ResampleUpscaler("Lanczos").upscale_by(im, 2)), np.asarray(want))


def test_upscale_to_a_size_for_the_hires_fix(x2_upscaler):
    im = rgb(16, 16)
    [out] = x2_upscaler.upscale([im], 24, 24)  # x1.5: one x2 pass, then Lanczos to exactly 24x24
    assert np.array_equal(np.asarray(out), np.asarray(x2_upscaler.step(im).resize((24, 24), Image.LANCZOS)))
    # to 40x24: upscale_by the larger ratio 2.5 (two passes, Lanczos to 40x40), then Lanczos to 40x24
    [out] = x2_upscaler.upscale([im], 40, 24)
    want = x2_upscaler.step(x2_upscaler.step(im)).resize((40, 40), Image.LANCZOS).resize((40, 24), Image.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(want))
    [out] = x2_upscaler.upscale([im], 8, 8)  # smaller: Lanczos only, the model does not run
    assert np.array_equal(np.asarray(out), np.asarray(im.resize((8, 8), Image.LANCZOS)))


# ------------------------------------------------------------------------------------- the command


def upscale_cli(argv: list[str]) -> int:
    """``sdstudio upscale ...`` through the CLI's error handling (one line, exit status 2)."""
    parser = argparse.ArgumentParser(prog="sdstudio")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_upscale_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["upscale", *argv]))


@pytest.fixture
def files(tmp_path, spandrel):
    models = tmp_path / "models"
    models.mkdir()
    ref = randomize_(spandrel.Compact(num_feat=8, num_conv=2, upscale=2), seed=6)
    save_file(ref.state_dict(), models / "2x-Tiny.safetensors")
    save_file({"relative_position_index_SA": torch.zeros(3)}, models / "4x-Hat.safetensors")
    src = tmp_path / "in.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 64x48")
    rgb(64, 48, seed=1).save(src, pnginfo=info)
    rgb(30, 20, seed=2).save(tmp_path / "b.png")
    rgb(1100, 8, seed=3).save(tmp_path / "wide.png")
    return types.SimpleNamespace(dir=tmp_path, models=models, src=src, b=tmp_path / "b.png")


def test_cli_writes_the_upscaled_png_with_a1111_extras_infotext(files, capsys):
    out = files.dir / "out.png"
    argv = [str(files.src), "--upscaler", "2x-Tiny", "--upscaler-dir", str(files.models), "--scale", "3",
            "--tile", "16", "--tile-overlap", "4", "-o", str(out), "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert upscale_cli(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (192, 144)
        text = dict(im.text)
        pixels = np.asarray(im.convert("RGB"))
    infotext = "Postprocess upscale by: 3, Postprocess upscaler: 2x-Tiny"
    assert text == {
        "parameters": "a red circle\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 64x48",
        "postprocessing": infotext,
        "extras": infotext,
    }
    up = load_upscaler(files.models / "2x-Tiny.safetensors", tiling=Tiling(16, 4))
    with Image.open(files.src) as im:
        assert np.array_equal(pixels, np.asarray(up.upscale_by(im.convert("RGB"), 3)))


def test_cli_outdir_and_resamplers(files, capsys):
    outdir = files.dir / "up"
    argv = [str(files.src), str(files.b), "--upscaler", "Lanczos", "--scale", "1.5", "--outdir", str(outdir), "-q"]
    assert upscale_cli(argv) == 0
    assert capsys.readouterr().out.split() == [str(outdir / "in.png"), str(outdir / "b.png")]
    with Image.open(outdir / "b.png") as im:
        assert im.size == (40, 24) and im.text == {"postprocessing": "Postprocess upscale by: 1.5, Postprocess "
                                                   "upscaler: Lanczos", "extras": im.text["postprocessing"]}  # fmt: skip


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda f: [str(f.dir / "missing.png"), "--upscaler", "Lanczos"], r"missing\.png: no such input image file"),
        (lambda f: [str(f.dir / "notes.png"), "--upscaler", "Lanczos"], r"notes\.png: cannot read the input image"),
        (lambda f: [str(f.src), "--upscaler", "2x-Tiy", "--upscaler-dir", str(f.models)],
         r"upscaler '2x-Tiy' not found in .*models; closest names: 2x-Tiny, 4x-Hat; built in: Lanczos, Nearest"),
        (lambda f: [str(f.src), "--upscaler", "2x-Tiny"], r"no upscaler folder given \(--upscaler-dir DIR\)"),
        (lambda f: [str(f.src), "--upscaler", "4x-Hat", "--upscaler-dir", str(f.models), "--overwrite"],
         r"4x-Hat\.safetensors: not an upscaler sdstudio can run: it has HAT's key .* but not the rest"),
        (lambda f: [str(f.src), "--upscaler", str(f.dir / "nope.pth")], r"nope\.pth: no such upscaler file"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "--scale", "0"], r"--scale must be"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "--tile", "8", "--tile-overlap", "8"],
         r"overlap \(8\) must be smaller than the tile size \(8\)"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "--scale", "0.1"], r"in\.png: 64x48 scaled by 0\.1 is under 8"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "--scale", "16", "-o", str(f.dir / "big.png")],
         None),  # 1024x768: allowed (a control for the next)
        (lambda f: [str(f.dir / "wide.png"), "--upscaler", "Lanczos", "--scale", "16"],
         r"wide\.png: 1100x8 scaled by 16 is 17600x128; at most 16384 a side"),
        (lambda f: [str(f.src), str(f.b), "--upscaler", "Lanczos", "-o", str(f.dir / "out.png")],
         r"-o names one file but 2 images were given"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "-o", str(f.src)], r"in\.png: is an input image"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "-o", str(f.dir / "out.jpg")], r"must end in \.png"),
        (lambda f: [str(f.src), "--upscaler", "Lanczos", "-o", str(f.dir / "taken.png")],
         r"taken\.png: already exists; pass --overwrite"),
    ],
    ids=[
        "missing", "unreadable", "unknown-name", "no-dir", "unknown-arch", "no-file", "scale", "overlap",
        "too-small", "control", "too-large", "two-to-one", "onto-input", "not-png", "exists",
    ],
)
def test_cli_refuses_bad_input_before_any_work(files, capsys, make_argv, message):
    (files.dir / "notes.png").write_text("not an image")
    taken = files.dir / "taken.png"
    taken.write_bytes(b"keep me")
    argv = make_argv(files)
    if "-o" not in argv:
        argv += ["-o", str(taken), "--overwrite"]  # yet it must stay untouched
    before = sorted(p.name for p in files.dir.iterdir())
    code = upscale_cli(argv)
    captured = capsys.readouterr()
    if message is None:
        assert code == 0
        return
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sdstudio: error: "), err
    assert re.search(message, err[0]), err[0]
    assert sorted(p.name for p in files.dir.iterdir()) == before and taken.read_bytes() == b"keep me"
    assert captured.out == ""
