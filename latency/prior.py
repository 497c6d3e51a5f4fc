"""An analytical iPhone 12 latency prior, for a *predicted* LUT until measurements are imported.

No iPhone is needed: every block spec is described by a few additive features, and a
non-negative linear model over them is fitted to the published iPhone 12 latencies of the
seven EfficientFormer presets (one table throughout: the EfficientFormerV2 paper's, which also
lists V1 models; docs/design.md, section 3):

======================  =========
preset                  iPhone 12
======================  =========
efficientformer_l1      1.4 ms
efficientformer_l3      2.7 ms
efficientformer_l7      6.6 ms
efficientformerv2_s0    0.9 ms
efficientformerv2_s1    1.1 ms
efficientformerv2_s2    1.6 ms
efficientformerv2_l     2.7 ms
======================  =========

Features of a block (all additive, so a network's features are the sums of its blocks'):

* ``macs_dense``: multiply-accumulates of dense convolutions and linear layers;
* ``macs_dw``: of depthwise and grouped convolutions;
* ``macs_attn``: of attention matrix products (``q @ k``, ``attn @ v``, talking heads);
* ``act``: output-activation elements of every op (convs, matrix products, activations,
  softmax, norms that are not folded, residual adds): a proxy for memory traffic;
* ``const``: one per network, the per-inference overhead. It belongs to no block: a predicted
  LUT stores it as its calibration offset, so a network's prediction is still the sum of its
  blocks plus that offset.

All of them come from the block kind's op trace (:mod:`search_spaces.ops`), the same trace
that exact counting reads, so the three MAC features add up to :func:`search_spaces.block_macs`.
The default model uses ``macs`` (their sum), ``act`` and ``const``: leave-one-out MAPE 7.5% (max 10.5%),
against 10.7% (max 19.9%) for ``macs`` and ``const`` alone. :func:`fit_prior` fits any subset with
non-negative least squares (a small active-set solver, :func:`nnls`; no scipy) and reports the
leave-one-out error over the presets. The prior describes 224x224 ImageNet-size models; at
other resolutions it extrapolates, and every figure it gives is labelled *predicted*.

>>> prior = iphone12_prior()
>>> prior.features
('macs', 'act', 'const')
>>> 0.0 < prior.loo_mape < 0.2
True
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from search_spaces import BlockSpec, get_preset, lower
from search_spaces.errors import NasUserError
from search_spaces.kinds import trace

if TYPE_CHECKING:
    from latency.lut import LatencyTable
    from latency.profiles import DeviceProfile
    from latency.specs import ResolutionLike
    from search_spaces import LoweringSetup, SearchSpace

__all__ = [
    "IPHONE12_PRESET_MS",
    "IPHONE12_SOURCE",
    "FEATURES",
    "DEFAULT_FEATURES",
    "block_features",
    "nnls",
    "LatencyPrior",
    "fit_prior",
    "iphone12_prior",
    "predicted_table",
]

#: Published iPhone 12 latencies (ms) of the presets, all from the EfficientFormerV2 paper's table.
IPHONE12_PRESET_MS: dict[str, float] = {
    "efficientformer_l1": 1.4,
    "efficientformer_l3": 2.7,
    "efficientformer_l7": 6.6,
    "efficientformerv2_s0": 0.9,
    "efficientformerv2_s1": 1.1,
    "efficientformerv2_s2": 1.6,
    "efficientformerv2_l": 2.7,
}
IPHONE12_SOURCE = "EfficientFormerV2 paper (Li et al., 2022), latency table: iPhone 12, CoreML, 224x224, batch 1"

#: Every feature :func:`block_features` computes. ``macs`` is the sum of the three MAC classes.
FEATURES: tuple[str, ...] = ("macs", "macs_dense", "macs_dw", "macs_attn", "act", "const")
DEFAULT_FEATURES: tuple[str, ...] = ("macs", "act", "const")
_SCALE = {"macs": 1e9, "macs_dense": 1e9, "macs_dw": 1e9, "macs_attn": 1e9, "act": 1e6, "const": 1.0}
_UNIT = {"macs": "ms per GMAC", "macs_dense": "ms per GMAC", "macs_dw": "ms per GMAC",
         "macs_attn": "ms per GMAC", "act": "ms per million activation elements", "const": "ms per inference"}


def block_features(spec: BlockSpec) -> dict[str, float]:
    """Additive cost features of one block, read off its op trace (see the module docstring).

    Args:
        spec: the block.

    Returns:
        ``{"macs", "macs_dense", "macs_dw", "macs_attn", "act"}`` in raw counts (MACs and
        elements at batch 1); ``macs`` equals :func:`search_spaces.block_macs` by construction.

    >>> f = block_features(BlockSpec("ef2.ffn", cin=48, cout=48, h=14, w=14, hidden=192))
    >>> f["macs"] == f["macs_dense"] + f["macs_dw"] + f["macs_attn"]
    True
    """
    t = trace(spec)
    return {"macs": float(t.macs), "macs_dense": float(t.dense), "macs_dw": float(t.dw),
            "macs_attn": float(t.attn), "act": float(t.act)}


def _feature_row(specs: Iterable[BlockSpec], features: Sequence[str]) -> np.ndarray:
    row = np.array([1.0 if name == "const" else 0.0 for name in features])
    for spec in specs:
        f = block_features(spec)
        row += [0.0 if name == "const" else f[name] / _SCALE[name] for name in features]
    return row


# --------------------------------------------------------------------------- NNLS
def nnls(a: Any, b: Any, *, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares: ``argmin ||a x - b||`` subject to ``x >= 0``.

    The Lawson-Hanson active-set method, for the small problems of this module (a handful of
    columns).

    Args:
        a: matrix ``(m, n)``.
        b: vector ``(m,)``.
        max_iter: iteration cap (default ``3 * n``).

    Returns:
        ``x`` of shape ``(n,)``, every element ``>= 0``.

    Raises:
        NasUserError: shapes that do not fit, or values that are not finite.

    >>> nnls([[1.0, 0.0], [0.0, 1.0]], [2.0, -1.0]).tolist()
    [2.0, 0.0]
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 1 or a.shape[0] != b.shape[0]:
        raise NasUserError(f"nnls needs a (m, n) matrix and an (m,) vector, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise NasUserError("nnls inputs must be finite")
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(1.0, float(np.abs(a).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter if max_iter is not None else 3 * n + 10):
        w = a.T @ (b - a @ x)
        candidates = ~passive & (w > tol)
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, w, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


# --------------------------------------------------------------------------- the prior
@dataclass(frozen=True)
class LatencyPrior:
    """A fitted non-negative linear latency model over block features.

    Attributes:
        device: the device the prior describes.
        features: the feature names, a subset of :data:`FEATURES`.
        coefficients: one per feature, ms per unit (GMACs for MAC features, millions of
            elements for ``act``, one inference for ``const``), all ``>= 0``.
        fitted_on: the presets and their published latencies (ms).
        fit_ms: in-sample predictions of those presets.
        loo_ms: leave-one-out predictions (each preset predicted by a fit to the other six).
        loo_mape: mean absolute percentage error of ``loo_ms`` (a fraction).
        loo_max_ape: the largest absolute percentage error of ``loo_ms``.
        source: where the published latencies come from.
    """

    device: str
    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    fitted_on: dict[str, float] = field(default_factory=dict)
    fit_ms: dict[str, float] = field(default_factory=dict)
    loo_ms: dict[str, float] = field(default_factory=dict)
    loo_mape: float = math.nan
    loo_max_ape: float = math.nan
    source: str = ""

    @property
    def overhead_ms(self) -> float:
        """The per-inference constant (0 without the ``const`` feature)."""
        return dict(zip(self.features, self.coefficients)).get("const", 0.0)

    def block_ms(self, spec: BlockSpec) -> float:
        """Predicted latency of one block, in ms (the per-inference overhead excluded)."""
        f = block_features(spec)
        return float(sum(c * f[name] / _SCALE[name] for name, c in zip(self.features, self.coefficients)
                         if name != "const"))

    def network_ms(self, specs: Iterable[BlockSpec]) -> float:
        """Predicted latency of a lowered network: the sum of its blocks plus the overhead."""
        return float(sum(self.block_ms(s) for s in specs)) + self.overhead_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in a predicted LUT's header)."""
        return {
            "device": self.device,
            "model": "non-negative linear model over additive block features, fitted by NNLS",
            "features": list(self.features),
            "coefficients": {n: c for n, c in zip(self.features, self.coefficients)},
            "units": {n: _UNIT[n] for n in self.features},
            "fitted_on_ms": dict(self.fitted_on),
            "fit_ms": {k: round(v, 4) for k, v in self.fit_ms.items()},
            "loo_ms": {k: round(v, 4) for k, v in self.loo_ms.items()},
            "loo_mape": self.loo_mape,
            "loo_max_ape": self.loo_max_ape,
            "source": self.source,
        }


def fit_prior(
    targets_ms: dict[str, float] | None = None,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    device: str = "iphone12",
    resolution: int = 224,
) -> LatencyPrior:
    """Fit a :class:`LatencyPrior` to published whole-model latencies of presets.

    Args:
        targets_ms: preset name -> latency in ms (default :data:`IPHONE12_PRESET_MS`).
        features: feature names from :data:`FEATURES`.
        device: the device the latencies were measured on.
        resolution: input side the latencies were published for.

    Returns:
        The fitted prior, with its leave-one-out predictions and error.

    Raises:
        NasUserError: an unknown feature or preset, fewer than 3 presets, or a latency that
            is not positive.

    >>> round(fit_prior(features=("macs", "const")).loo_mape, 3)
    0.107
    """
    targets = dict(IPHONE12_PRESET_MS if targets_ms is None else targets_ms)
    feats = tuple(features)
    unknown = [f for f in feats if f not in FEATURES]
    if unknown or not feats:
        raise NasUserError(f"`features` must be a non-empty subset of {', '.join(FEATURES)}; got {list(feats)}")
    if len(targets) < 3:
        raise NasUserError(f"fitting a prior needs at least 3 presets with latencies, got {len(targets)}")
    bad = {k: v for k, v in targets.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise NasUserError(f"preset latencies must be positive milliseconds, got {bad}")
    names = list(targets)
    x = np.stack([_feature_row(lower(get_preset(n), resolution=resolution), feats) for n in names])
    y = np.array([targets[n] for n in names], dtype=np.float64)
    coef = nnls(x, y)
    fit = x @ coef
    loo = np.empty_like(y)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        loo[i] = x[i] @ nnls(x[keep], y[keep])
    ape = np.abs(loo - y) / y
    return LatencyPrior(
        device=device,
        features=feats,
        coefficients=tuple(float(c) for c in coef),
        fitted_on={n: float(v) for n, v in zip(names, y)},
        fit_ms={n: float(v) for n, v in zip(names, fit)},
        loo_ms={n: float(v) for n, v in zip(names, loo)},
        loo_mape=float(ape.mean()),
        loo_max_ape=float(ape.max()),
        source=IPHONE12_SOURCE if targets_ms is None else "user-supplied latencies",
    )


_CACHE: dict[tuple[str, ...], LatencyPrior] = {}


def iphone12_prior(features: Sequence[str] = DEFAULT_FEATURES) -> LatencyPrior:
    """The iPhone 12 prior fitted on :data:`IPHONE12_PRESET_MS` (cached per feature set).

    >>> iphone12_prior().device
    'iphone12'
    """
    key = tuple(features)
    if key not in _CACHE:
        _CACHE[key] = fit_prior(features=key)
    return _CACHE[key]


def predicted_table(
    space: SearchSpace,
    profile: DeviceProfile,
    *,
    setup: LoweringSetup | None = None,
    resolution: ResolutionLike | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    distillation: bool | None = None,
    task: str | None = None,
    prior: LatencyPrior | None = None,
) -> LatencyTable:
    """A LUT whose every entry is *predicted* by ``prior`` (default :func:`iphone12_prior`).

    The prior's per-inference overhead becomes the table's calibration offset (method
    ``prior``), so a network's prediction is its blocks' sum plus that overhead, as fitted.
    The header says ``"predicted": true`` and ``"measurement": "predicted"``, and carries the
    prior's description (features, coefficients, leave-one-out error on the presets).

    Args:
        space: a :class:`~search_spaces.SearchSpace`.
        profile: the device's :class:`~latency.profiles.DeviceProfile`.
        setup: the lowering setup (a :class:`~search_spaces.LoweringSetup`); or its fields
            ``resolution``, ``num_classes``, ``in_chans``, ``distillation``, ``task`` as keywords.
        prior: the prior to use.

    Returns:
        A :class:`~latency.lut.LatencyTable` (not saved).
    """
    from latency.lut import Calibration
    from latency.specs import lut_specs, new_table, resolve_setup

    prior = prior or iphone12_prior()
    setup = resolve_setup(space, setup, resolution=resolution, num_classes=num_classes, in_chans=in_chans,
                          distillation=distillation, task=task)
    specs = lut_specs(space, setup)
    table = new_table(space, profile, setup, measurement="predicted", expected_entries=len(specs),
                      environment={"note": f"predicted by an analytical prior, not measured ({prior.source})"})
    for spec in specs:
        table.set_predicted(spec.key, prior.block_ms(spec))
    table.prior = prior.to_dict()
    table.set_calibration(Calibration("prior", 1.0, prior.overhead_ms, note="per-inference overhead of the prior"))
    return table
