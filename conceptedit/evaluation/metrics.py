"""Metrics computed from per-image scores: the Fréchet distance behind FID, attack and change rates.

FID compares two sets of images through Gaussians fitted to their Inception features:
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The trace of the matrix square root is
taken as ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, which has the same eigenvalues as ``(S1 S2)^(1/2)``
but only needs symmetric eigen-decompositions: no complex parts to discard, no scipy, and
rank-deficient covariances (fewer images than feature dimensions) need no added jitter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from conceptedit.evaluation.stats import Rate


def _root(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Square roots of a PSD matrix's eigenvalues, with those within round-off of 0 (as numpy's
    ``matrix_rank`` judges it) set to 0: the square root would blow 1e-16 up to 1e-8 per dimension."""
    tolerance = np.abs(values).max(initial=0.0) * values.size * np.finfo(np.float64).eps
    return np.sqrt(np.where(values > tolerance, values, 0.0))


def _psd_sqrt(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * _root(values)) @ vectors.T


def _covariance(sigma: ArrayLike, dim: int) -> NDArray[np.float64]:
    matrix = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if matrix.shape != (dim, dim):
        raise ValueError(f"covariance of shape {matrix.shape} does not match a mean of dimension {dim}")
    return (matrix + matrix.T) / 2


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    if m1.shape != m2.shape or m1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got shapes {m1.shape} and {m2.shape}")
    s1 = _covariance(sigma1, m1.size)
    s2 = _covariance(sigma2, m1.size)
    root1 = _psd_sqrt(s1)
    trace_root = float(_root(np.linalg.eigvalsh(root1 @ s2 @ root1).astype(np.float64)).sum())
    diff = m1 - m2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_root), 0.0)


def feature_statistics(features: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean and unbiased covariance of ``features`` (one row per image), as FID implementations fit them."""
    rows = np.asarray(features, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"need a matrix of at least 2 feature rows, got shape {rows.shape}")
    return rows.mean(axis=0), np.cov(rows, rowvar=False)


def fid_from_features(a: ArrayLike, b: ArrayLike) -> float:
    """FID between two feature sets (rows: images; e.g. the ``inception`` rows of ``fid-features``)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def attack_metrics(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of an attacked suite from an attack evaluator's rows (``plain_shown``, ``success``):
    the concept rate without attack, the attack success rate (plain successes count, as in
    UnlearnDiffAtk), each with n and its Wilson interval, and what the attack added; with the
    attack's cost where the rows carry it (judged generations per prompt, seconds in all)."""
    n = len(scores)
    plain = sum(bool(s["plain_shown"]) for s in scores)
    success = sum(bool(s["success"]) for s in scores)
    out = {
        **Rate.of(plain, n).as_dict("plain_shown"),
        **Rate.of(success, n).as_dict("attack_success_rate"),
        "attack_gain": (success - plain) / max(n, 1),
    }
    if scores and all("generations" in s and "seconds" in s for s in scores):
        out["attack_generations_per_prompt"] = sum(int(s["generations"]) for s in scores) / n
        out["attack_seconds"] = sum(float(s["seconds"]) for s in scores)
    return out


def change_metrics(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means of the ``change-from-base`` evaluator's per-image distances."""
    n = max(len(scores), 1)
    return {key: sum(float(s[key]) for s in scores) / n for key in ("pixel_mae", "latent_rmse", "latent_relative")}
