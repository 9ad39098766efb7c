"""Fit the step-time model's efficiency knobs (PerfParams) to measured step times.

Objective: sum over runs of (ln t_pred − ln t_meas)² (relative error, so small and large runs
weigh alike) plus a weak pull, prior_weight·(ln θ − ln θ₀)², toward the cluster file's values, so
that knobs the data cannot see (e.g. inter-node bandwidth when every run sits in one node) stay
where the datasheet put them instead of wandering. Minimised by Levenberg-Marquardt with each knob
kept inside its bounds by a logistic change of variable (few knobs, cheap model: no SciPy needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.timing import step_time

# knob -> (lower, upper, pulled toward the cluster file's value?). All are searched on a log scale.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "matmul_efficiency": (1e-4, 2.0, True),
    "matmul_half_width": (1.0, 1e5, True),
    "nvlink_efficiency": (0.02, 1.0, True),
    "internode_efficiency": (0.02, 1.0, True),
    "step_overhead_s": (1e-6, 1e3, False),  # often 0 in the file: no pull toward it
    "fp8_speedup": (1.0, 2.0, True),
    "attention_efficiency": (0.05, 1.0, True),
    "attention_half_length": (1.0, 1e5, True),
    "elementwise_passes": (0.1, 400.0, True),
}
DEFAULT_FIT = ("matmul_efficiency", "matmul_half_width", "nvlink_efficiency", "internode_efficiency")


@dataclass(frozen=True)
class Measurement:
    workload: Workload
    layout: Layout
    step_time_s: float
    label: str = ""


@dataclass(frozen=True)
class FitResult:
    cluster: ClusterConfig  # the input cluster with fitted perf knobs
    fitted: dict[str, float]
    rms_rel_error_before: float
    rms_rel_error_after: float
    rel_errors: tuple[float, ...]  # (pred − meas)/meas per measurement, after the fit


def predict(cluster: ClusterConfig, meas: Measurement) -> float:
    return step_time(meas.workload, meas.layout, cluster).total_s


def rel_errors(cluster: ClusterConfig, data: Sequence[Measurement]) -> list[float]:
    return [predict(cluster, d) / d.step_time_s - 1.0 for d in data]


def _rms(xs: Iterable[float]) -> float:
    xs = list(xs)
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else 0.0


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


class _Transform:
    """Unbounded z <-> knob value inside its bounds, logistic in the log of the value."""

    def __init__(self, knob: str):
        lo, hi, pull = BOUNDS[knob]
        self.pull = pull
        self.lo, self.hi = math.log(lo), math.log(hi)

    def value(self, z: float) -> float:
        return math.exp(self.lo + (self.hi - self.lo) * _sigmoid(z))

    def z(self, value: float) -> float:
        # start no closer than 1e-3 to a bound so that the logistic is not flat there
        frac = (math.log(max(value, 1e-300)) - self.lo) / (self.hi - self.lo)
        return _logit(min(max(frac, 1e-3), 1 - 1e-3))


def fit(cluster: ClusterConfig, data: Sequence[Measurement], knobs: Sequence[str] = DEFAULT_FIT,
        prior_weight: float = 1e-3, max_iters: int = 100) -> FitResult:
    """Fit `knobs` of cluster.perf to the measurements (see module docstring).

    Levenberg-Marquardt on the log-ratio residuals, each knob mapped to an unbounded variable
    through a logistic transform of its bounds, finite-difference Jacobian.
    """
    if not data:
        raise ValueError("calibration needs at least one measured run")
    for k in knobs:
        if k not in BOUNDS:
            raise ValueError(f"--fit {k!r}: not a calibratable knob; choose from {sorted(BOUNDS)}")
    for d in data:
        if not d.step_time_s > 0:
            raise ValueError(f"measurement {d.label or d.layout.label()}: step time must be > 0, got {d.step_time_s}")
    tf = [_Transform(k) for k in knobs]
    prior = [getattr(cluster.perf, k) for k in knobs]
    z0 = np.array([t.z(v) for t, v in zip(tf, prior)])
    sq = math.sqrt(prior_weight)

    def values(z: np.ndarray) -> dict[str, float]:
        return {k: t.value(float(zi)) for k, t, zi in zip(knobs, tf, z)}

    def residuals(z: np.ndarray) -> np.ndarray:
        c = cluster.with_perf(**values(z))
        r = [math.log(predict(c, d)) - math.log(d.step_time_s) for d in data]
        # weak pull toward the cluster file, measured in log-value space for rate knobs
        for i, (t, v0) in enumerate(zip(tf, prior)):
            if t.pull:
                r.append(sq * (math.log(t.value(float(z[i]))) - math.log(max(v0, 1e-300))))
        return np.array(r)

    before = _rms(rel_errors(cluster, data))
    z = z0.copy()
    r = residuals(z)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iters):
        jac = np.empty((len(r), len(z)))
        for j in range(len(z)):
            dz = np.zeros_like(z)
            dz[j] = 1e-6 * max(1.0, abs(z[j]))
            jac[:, j] = (residuals(z + dz) - r) / dz[j]
        g = jac.T @ r
        a = jac.T @ jac
        improved = False
        for _try in range(12):
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            zn = z + step
            rn = residuals(zn)
            cn = float(rn @ rn)
            if cn < cost:
                improved = cost - cn > 1e-14 * max(1.0, cost)
                z, r, cost = zn, rn, cn
                lam = max(lam / 3, 1e-9)
                break
            lam *= 4
        if not improved:
            break
    fitted = values(z)
    fitted_cluster = cluster.with_perf(**fitted)
    errs = rel_errors(fitted_cluster, data)
    return FitResult(cluster=fitted_cluster, fitted=fitted, rms_rel_error_before=before,
                     rms_rel_error_after=_rms(errs), rel_errors=tuple(errs))


__all__ = ["Measurement", "FitResult", "fit", "predict", "rel_errors", "BOUNDS", "DEFAULT_FIT"]
