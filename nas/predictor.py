"""An accuracy predictor fitted on the subnets already evaluated (as Once-for-All does).

The architecture encoding is fixed-length per space (:func:`encode`): per stage the width, depth and
number of attention blocks, and per block slot its expansion and a one-hot of its mixer (zeros for
a slot beyond the depth), plus log-parameters and log-MACs. The model is ridge regression on
standardised features, refitted in closed form whenever new evaluations arrive; with a few dozen
evaluations it ranks the one-step neighbours of a subnet well enough to choose which of them get a
real evaluation. It never replaces a real evaluation in a reported figure.

>>> from search_spaces import get_space
>>> space = get_space("efficientformer_v2_demo")
>>> archs = [space.sample(i) for i in range(40)]
>>> x = np.stack([encode(space, a) for a in archs])
>>> y = 0.5 + 0.01 * x[:, 3]           # accuracy that grows with the first block's hidden width
>>> p = RidgePredictor.fit(x, y, alpha=1e-6)
>>> bool(np.abs(p.predict(x) - y).max() < 1e-4)
True
>>> round(spearman([1, 2, 3, 4], [10, 30, 20, 40]), 6)
0.8
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from search_spaces import ArchConfig, SearchSpace

__all__ = ["encode", "RidgePredictor", "spearman"]


def encode(space: SearchSpace, arch: ArchConfig, *, params: int | None = None, macs: int | None = None) -> np.ndarray:
    """The fixed-length feature vector of ``arch`` in ``space`` (float64)."""
    feats: list[float] = []
    for st, ch in zip(arch.stages, space.stages):
        n_attn = sum(b.mixer != ch.plain_mixer for b in st.blocks)
        feats += [float(st.width), float(st.depth), float(n_attn)]
        mixers = ch.attn_mixers
        for j in range(ch.depths[-1]):
            blk = st.blocks[j] if j < st.depth else None
            feats.append(float(blk.expansion) * st.width if blk else 0.0)   # the block's hidden width
            feats += [1.0 if blk is not None and blk.mixer == m else 0.0 for m in mixers]
    if params is not None:
        feats.append(math.log(params))
    if macs is not None:
        feats.append(math.log(macs))
    return np.asarray(feats, dtype=np.float64)


@dataclass(frozen=True)
class RidgePredictor:
    """``y ~ w . standardise(x) + b``, fitted by ridge regression (closed form).

    Attributes:
        mean: feature means of the training set.
        scale: feature standard deviations (1 where a feature is constant).
        weights: coefficients on standardised features.
        bias: the intercept (the training targets' mean).
        n: number of training samples.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    n: int

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, alpha: float = 1.0) -> RidgePredictor:
        """Fit on ``x`` ``(N, D)`` and targets ``y`` ``(N,)``; ``alpha`` is the ridge penalty (> 0)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 1:
            raise ValueError(f"x must be (N, D) and y (N,) with N >= 1, got {x.shape} and {y.shape}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        z = (x - mean) / scale
        bias = float(y.mean())
        # (Z'Z + alpha I) w = Z'(y - b); with D > N the dual form is cheaper, but D is small here
        a = z.T @ z + alpha * np.eye(z.shape[1])
        w = np.linalg.solve(a, z.T @ (y - bias))
        return cls(mean, scale, w, bias, int(x.shape[0]))

    @classmethod
    def fit_loo(cls, x: np.ndarray, y: np.ndarray, *,
                alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0)) -> RidgePredictor:
        """Fit with the penalty of ``alphas`` that has the smallest leave-one-out error (exact, from the hat matrix)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape[0] < 3:
            return cls.fit(x, y, alpha=alphas[-1])
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        z = (x - mean) / scale
        yc = y - y.mean()
        best_alpha, best_err = alphas[-1], math.inf
        for alpha in alphas:
            inv = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T)
            hat = z @ inv + 1.0 / len(y)           # the intercept's share of the hat matrix
            resid = yc - z @ (inv @ yc)
            loo = resid / np.clip(1.0 - np.diag(hat), 1e-9, None)
            err = float(np.mean(loo ** 2))
            if err < best_err:
                best_alpha, best_err = alpha, err
        return cls.fit(x, y, alpha=best_alpha)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predictions for ``x`` ``(N, D)`` or ``(D,)``."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return z @ self.weights + self.bias


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); ``nan`` with fewer than 3 pairs or no spread."""
    import pandas as pd

    sa, sb = pd.Series(np.asarray(a, dtype=np.float64)), pd.Series(np.asarray(b, dtype=np.float64))
    if len(sa) != len(sb):
        raise ValueError(f"need pairs, got {len(sa)} and {len(sb)} values")
    if len(sa) < 3:
        return float("nan")
    # Pearson's correlation of the average ranks (pandas' own spearman needs scipy)
    ra, rb = sa.rank(method="average").to_numpy(), sb.rank(method="average").to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
