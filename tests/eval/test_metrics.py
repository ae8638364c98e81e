"""FID, KID, precision/recall and CLIP score: hand-computed values on tiny sets, and agreement with
torch-fidelity's own statistic functions on the same random features."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sdstudio.eval.metrics import clip_score, fid, frechet_distance, kid, precision_recall
from tests.eval.fidelity import torch_fidelity_module

# --------------------------------------------------------------------------------------------------
# FID


def test_fid_by_hand_1d() -> None:
    # a: mean 1, unbiased variance 2; b: mean 5, variance 4. In 1-D the Fréchet distance is
    # (mu1 - mu2)^2 + (sqrt(v1) - sqrt(v2))^2 = 16 + (sqrt 2 - 2)^2 = 22 - 4 sqrt 2.
    assert fid([[0.0], [2.0]], [[3.0], [5.0], [7.0]]) == pytest.approx(22 - 4 * math.sqrt(2), abs=1e-12)


def test_frechet_distance_closed_forms() -> None:
    # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(l1) - sqrt(l2))^2
    got = frechet_distance(
        np.array([0.0, 1.0]), np.diag([4.0, 9.0]), np.array([3.0, 1.0]), np.diag([1.0, 16.0])
    )
    assert got == pytest.approx(9 + (2 - 1) ** 2 + (3 - 4) ** 2, abs=1e-12)
    # non-commuting: the textbook formula with scipy's general matrix square root
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    want = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real) + 0.5**2
    assert frechet_distance(np.zeros(2), s1, np.array([0.5, 0.0]), s2) == pytest.approx(want, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(1.0, 2.0, size=(150, 8))
    assert abs(fid(a, a)) < 1e-9
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-10)


def test_fid_matches_torch_fidelity() -> None:
    tf_fid = torch_fidelity_module("metric_fid")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.5, size=(250, 16)) @ rng.normal(size=(16, 16))
    stats = [tf_fid.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    want = tf_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid(a, b) == pytest.approx(want, rel=1e-9)


def test_fid_refuses_one_sample_and_warns_on_singular_covariance(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="at least 2 images in each set, got 1 and 3"):
        fid(np.zeros((1, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="dimensions differ"):
        fid(np.zeros((3, 4)), np.ones((3, 5)))
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger="sdstudio.eval.metrics"):
        value = fid(rng.normal(size=(10, 16)), rng.normal(size=(10, 16)))
    assert math.isfinite(value) and value > 0
    assert "at least 17" in caplog.text and "singular" in caplog.text


# --------------------------------------------------------------------------------------------------
# KID


def test_kid_by_hand() -> None:
    # d = 1: k(x, y) = (x y + 1)^3. a = {0, 1}: off-diagonal mean k(0, 1) = 1; b = {1, 2}: k(1, 2) = 27;
    # cross: (k(0,1) + k(0,2) + k(1,1) + k(1,2)) / 4 = (1 + 1 + 8 + 27) / 4 = 9.25. MMD^2 = 1 + 27 - 18.5.
    # With subsets of the whole sets every subset is the same: std 0.
    mean, std = kid([[0.0], [1.0]], [[1.0], [2.0]], subsets=5, subset_size=2)
    assert mean == pytest.approx(9.5, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_matches_torch_fidelity() -> None:
    tf_kid = torch_fidelity_module("metric_kid")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(60, 8)), rng.normal(0.6, 1.2, size=(50, 8))
    want = tf_kid.kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=10, kid_subset_size=20, rng_seed=7, verbose=False,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
    )  # fmt: skip
    mean, std = kid(a, b, subsets=10, subset_size=20, seed=7)  # the same subsets: the same RandomState draws
    assert mean == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(want["kernel_inception_distance_std"], rel=1e-10)
    assert mean > 3 * std  # a real shift, not noise around 0


def test_kid_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match="needs at least 1000 images in each set, got 50 and 2000"):
        kid(np.zeros((50, 4)), np.zeros((2000, 4)))


# --------------------------------------------------------------------------------------------------
# Precision and recall


def test_precision_recall_by_hand() -> None:
    # k = 1. real {0, 1, 2, 3, 5}: radii 1, 1, 1, 1, 2. fake {0.5, 0.7, 3.9, 4.1, 10}: radii 0.2, 0.2,
    # 0.2, 0.2, 5.9. Precision: 0.5, 0.7 (near 0, 1), 3.9 (0.9 from 3), 4.1 (0.9 from 5, radius 2) are
    # inside, 10 is not: 4/5. Recall: only 5 is inside a fake ball (5 from 10, radius 5.9): 1/5.
    real = np.array([0.0, 1, 2, 3, 5])[:, None]
    fake = np.array([0.5, 0.7, 3.9, 4.1, 10])[:, None]
    pr = precision_recall(real, fake, k=1)
    assert (pr.precision, pr.recall, pr.k) == (pytest.approx(0.8), pytest.approx(0.2), 1)
    assert precision_recall(real, fake, k=1, batch=2) == pr  # batching does not change the answer


def test_precision_recall_matches_torch_fidelity() -> None:
    tf_prc = torch_fidelity_module("metric_prc")
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(80, 5)), rng.normal(0.5, 1.3, size=(70, 5))
    # torch-fidelity's order: features_1 generated, features_2 real
    want = tf_prc.calculate_precision_recall_full(
        torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3
    )
    pr = precision_recall(real, fake, k=3)
    assert (pr.precision, pr.recall) == pytest.approx(want, abs=1e-6)  # theirs: float32 means
    assert 0.1 < pr.precision < 0.9 and 0.1 < pr.recall < 0.99  # not a degenerate case (0.63, 0.95)


def test_precision_recall_needs_more_than_k() -> None:
    with pytest.raises(ValueError, match="more than 3 images in each set, got 3 and 10"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# --------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_by_hand() -> None:
    # cos 1 -> 100, orthogonal -> 0, opposite -> 0 (clamped), 60 degrees -> 50; scale does not matter
    images = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    texts = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert clip_score(images, texts) == pytest.approx((100 + 0 + 0 + 50) / 4, abs=1e-10)
    assert clip_score(torch.tensor(images[:1]), torch.tensor(texts[:1])) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one prompt per image, got 4 images and 1 prompts"):
        clip_score(images, texts[:1])
