"""Distances between two sets of image features, in float64: FID, KID, improved precision/recall, and
the CLIP score of images against their prompts.

Each takes feature arrays ``[n, d]`` (numpy or torch); which network made them is the caller's business
(``features.py``). Argument order: the reference (real) set first, the generated (fake) set second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

INCEPTION_DIM = 2048


def _as_features(x: object, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected features [n, d], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return arr


def _pair(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    fa, fb = _as_features(a, "first feature set"), _as_features(b, "second feature set")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    return fa, fb


# --------------------------------------------------------------------------------------------------
# FID


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; eigenvalues that
    rounding pushed below zero count as zero."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; the FID of
    Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64.

    ``S1 S2`` is not symmetric, but it is similar to ``S1^(1/2) S2 S1^(1/2)``, which is symmetric PSD, so
    the trace of its square root is the sum of square roots of that matrix's eigenvalues. This needs no
    regularisation for singular covariances (pytorch-fid's ``sqrtm`` adds ``1e-6 I`` when it fails).
    Linear algebra in torch: numpy's BLAS threads crawl beside torch's busy OpenMP pool (16 ms for a
    150x128 product that torch does in 1.6 ms, measured on 2 cores after a torch convolution).
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(x, np.float64)) for x in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean)


def _cov(x: np.ndarray) -> np.ndarray:
    """Unbiased covariance [d, d] of samples [n, d] (``np.cov(x, rowvar=False)``), computed in torch."""
    t = torch.from_numpy(x)
    t = t - t.mean(0)
    return ((t.T @ t) / (len(x) - 1)).numpy()


def fid(feats_a: object, feats_b: object) -> float:
    """FID: the Fréchet distance of the Gaussians fitted to two feature sets (mean, unbiased covariance).

    Refuses fewer than 2 samples in a set. With ``n <= d`` samples the covariance is singular (rank
    ``n - 1``); the distance is computed anyway, as pytorch-fid and torch-fidelity do, with a warning: it
    is then biased upwards and not comparable to FIDs of more images (Inception: ``d = 2048``).
    """
    a, b = _pair(feats_a, feats_b)
    n_min, d = min(len(a), len(b)), a.shape[1]
    if n_min < 2:
        raise ValueError(f"FID needs at least 2 images in each set, got {len(a)} and {len(b)}")
    if n_min <= d:
        log.warning(
            "FID from %d and %d images of %d-d features: the covariance is singular (FID needs more images "
            "than the feature dimension, at least %d, for a full-rank one); computed anyway, biased upwards "
            "and comparable only to FIDs of as many images", len(a), len(b), d, d + 1,
        )  # fmt: skip
    return frechet_distance(a.mean(0), _cov(a), b.mean(0), _cov(b))


# --------------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's kernel ``k(x, y) = (x . y / d + 1)^3``. [n, d], [m, d] -> [n, m]"""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased estimate of MMD^2 between two samples of equal size ``m`` under the polynomial kernel:
    mean off-diagonal k(x, x') + mean off-diagonal k(y, y') - 2 mean k(x, y) (Bińkowski et al. 2018)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(
    feats_a: object, feats_b: object, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 of the cubic polynomial
    kernel, averaged over ``subsets`` random subsets of ``subset_size`` samples of each set (drawn
    without replacement within a subset); returns (mean, std over subsets), as torch-fidelity does
    (``np.random.RandomState(seed)``, the first set's subset drawn first, population std).

    Refuses a set smaller than ``subset_size``, as torch-fidelity does.
    """
    a, b = _pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"KID needs at least 1 subset, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"KID subset size must be at least 2, got {subset_size}")
    if min(len(a), len(b)) < subset_size:
        raise ValueError(
            f"KID with subsets of {subset_size} needs at least {subset_size} images in each set, got "
            f"{len(a)} and {len(b)}; use a subset size of at most {min(len(a), len(b))}"
        )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = ta[torch.from_numpy(rng.choice(len(a), subset_size, replace=False))]
        y = tb[torch.from_numpy(rng.choice(len(b), subset_size, replace=False))]
        mmds[i] = mmd2_unbiased(x, y)
    return float(mmds.mean()), float(mmds.std())


# --------------------------------------------------------------------------------------------------
# Precision and recall


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision (fake samples inside the real manifold) and recall (real samples inside the
    fake manifold), each a fraction in [0, 1]; ``k`` the neighbourhood size of the manifolds' radii."""

    precision: float
    recall: float
    k: int


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample. [n, d] -> [n]"""
    out = [torch.cdist(x[i : i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)]
    return torch.cat(out)  # k + 1: each sample is its own nearest neighbour, at distance 0


def _inside_fraction(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of ``query`` samples within ``radii[j]`` of some ``support[j]`` (balls closed)."""
    inside = [
        (torch.cdist(query[i : i + batch], support) <= radii).any(dim=1) for i in range(0, len(query), batch)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: object, fake: object, k: int = 3, batch: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
    balls around its samples with radius the distance to the k-th nearest neighbour in the same set;
    precision is the fraction of fake samples in the real manifold, recall the fraction of real samples
    in the fake manifold. Euclidean distances in float64, ``batch`` rows at a time."""
    r, f = (torch.from_numpy(x) for x in _pair(real, fake))
    if k < 1:
        raise ValueError(f"precision/recall needs k >= 1, got {k}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set, got "
                         f"{len(r)} and {len(f)}")  # fmt: skip
    precision = _inside_fraction(f, r, _kth_neighbour_radii(r, k, batch), batch)
    recall = _inside_fraction(r, f, _kth_neighbour_radii(f, k, batch), batch)
    return PrecisionRecall(precision, recall, k)


# --------------------------------------------------------------------------------------------------
# CLIP score


def clip_score(image_embeds: object, text_embeds: object) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics' ``CLIPScore``): the mean over image-prompt pairs of
    ``100 * max(cos(image, text), 0)``; row ``i`` of each is one pair."""
    im, tx = _pair(image_embeds, text_embeds)
    if len(im) != len(tx):
        raise ValueError(f"CLIP score needs one prompt per image, got {len(im)} images and {len(tx)} prompts")
    if len(im) == 0:
        raise ValueError("CLIP score of no images")
    norms = np.linalg.norm(im, axis=1) * np.linalg.norm(tx, axis=1)
    if (norms == 0).any():
        raise ValueError("CLIP score: an embedding is all zeros")
    cos = (im * tx).sum(1) / norms
    return float((100.0 * np.clip(cos, 0.0, None)).mean())
