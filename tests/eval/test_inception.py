"""The FID Inception-v3 against torch-fidelity's (``feature_extractor_inceptionv3.py``, itself adapted from
pytorch-fid) on random weights, the same state dict loaded into both; and the weights file checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.errors import SdStudioError
from sdstudio.eval.inception import FidInceptionV3, load_inception, preprocess, resize_bilinear_tf1
from sdstudio.toyworld.world import render, sample_scene
from tests.eval.fidelity import torch_fidelity_module

TOL = 1e-4


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID Inception weights whose features differ between images: He-normal convolutions,
    BatchNorm scale ~N(1, 0.1), shift and running mean ~N(0, 0.1), running variance in [1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in FidInceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(("bn.bias", "running_mean")):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif k.startswith("fc."):
            state[k] = 0.01 * torch.randn(v.shape, generator=g)
        else:
            state[k] = v  # num_batches_tracked
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_state(), path)
    return path


def _batches() -> list[torch.Tensor]:
    """uint8 [B, 3, H, W]: two toy renders (64x64: upsampled) and one noise image of odd size."""
    rng = np.random.default_rng(0)
    toys = np.stack([render(sample_scene(rng, "train", n)) for n in (1, 2)])
    noise = rng.integers(0, 256, (1, 37, 53, 3), dtype=np.uint8)
    return [torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (toys, noise)]


def test_resize_tf1_matches_torch_fidelity() -> None:
    tf = torch_fidelity_module("interpolate_compat_tensorflow")
    x = torch.rand(2, 3, 37, 53) * 255
    for size in ((299, 299), (20, 11), (37, 53)):
        ref = tf.interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False)
        assert torch.equal(resize_bilinear_tf1(x, size), ref), size
    assert torch.equal(resize_bilinear_tf1(x, (37, 53)), x)  # same size: identity
    # and it is not pytorch's half-pixel bilinear (what pytorch-fid uses)
    assert (
        resize_bilinear_tf1(x, (299, 299)) - F.interpolate(x, (299, 299), mode="bilinear")
    ).abs().max() > 1


def test_features_match_torch_fidelity(weights: Path) -> None:
    fe = torch_fidelity_module("feature_extractor_inceptionv3")
    ref = fe.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    ours = load_inception(weights)
    batches = _batches()
    with torch.no_grad():
        got = [ours(b) for b in batches]
        want = [ref(b)[0] for b in batches]
        diff = max((g - w).abs().max().item() for g, w in zip(got, want))
        assert diff <= TOL, diff  # measured: 0.0 (bit-exact on CPU)
        feats = torch.cat(got)
        assert feats.shape == (3, 2048) and feats.dtype == torch.float32
        # features differ between images far beyond the tolerance, so the comparison means something
        spread = (feats[:, None] - feats[None]).abs().amax(-1)
        assert spread[~torch.eye(3, dtype=torch.bool)].min() > 100 * TOL  # measured: 0.087

        # the check can fail: a skipped block, or pytorch-fid's resize and normalisation instead
        noise = batches[1]
        skipped = load_inception(weights)
        skipped.Mixed_6c = torch.nn.Identity()
        assert (skipped(noise) - want[1]).abs().max() > 100 * TOL  # measured: 0.77
        x = F.interpolate(noise.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        assert (ours.pool_features(x) - want[1]).abs().max() > 100 * TOL  # measured: 0.027


def test_preprocess_range_and_input_checks() -> None:
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    out = preprocess(x)
    assert out.shape == (1, 3, 299, 299)
    assert out[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]  # (x - 128) / 128, as the TF graph
    with pytest.raises(ValueError, match="uint8"):
        preprocess(x.float())


def test_load_inception_refuses_wrong_files(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(SdStudioError, match="no such"):
        load_inception(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(SdStudioError, match="not a PyTorch weights file") as e:
        load_inception(tmp_path / "text.pth")
    assert "\n" not in str(e.value)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(SdStudioError, match="not the FID Inception-v3 weights"):
        load_inception(tmp_path / "other.pth")
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the TF graph's 1008
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(SdStudioError, match=r"fc.weight has shape \(1000, 2048\)"):
        load_inception(tmp_path / "shape.pth")
    # BatchNorm counters may be absent (older torch saves)
    del state["fc.weight"]
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if "num_batches" not in k}
    torch.save(state, tmp_path / "counters.pth")
    assert torch.equal(load_inception(tmp_path / "counters.pth").fc.weight, state["fc.weight"])
