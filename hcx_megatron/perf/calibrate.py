"""Fit the step-time model's efficiency knobs (PerfParams) to measured step times.

Objective: sum over runs of (ln t_pred − ln t_meas)² (relative error, so small and large runs
weigh alike) plus a weak pull, prior_weight·(ln θ − ln θ₀)², toward the cluster file's values, so
that knobs the data cannot see (e.g. inter-node bandwidth when every run sits in one node) stay
where the datasheet put them instead of wandering. Minimised by cyclic coordinate descent with a
golden-section line search per knob inside its bounds (few knobs, cheap model: no SciPy needed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.timing import step_time

# knob -> (lower, upper, log-scale?)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "matmul_efficiency": (1e-4, 2.0, True),
    "matmul_half_width": (1.0, 1e5, True),
    "nvlink_efficiency": (0.02, 1.0, True),
    "internode_efficiency": (0.02, 1.0, True),
    "step_overhead_s": (0.0, 1e3, False),
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


def _golden(f: Callable[[float], float], lo: float, hi: float, iters: int = 40) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit(cluster: ClusterConfig, data: Sequence[Measurement], knobs: Sequence[str] = DEFAULT_FIT,
        prior_weight: float = 1e-3, sweeps: int = 8) -> FitResult:
    """Fit `knobs` of cluster.perf to the measurements (see module docstring)."""
    if not data:
        raise ValueError("calibration needs at least one measured run")
    for k in knobs:
        if k not in BOUNDS:
            raise ValueError(f"--fit {k!r}: not a calibratable knob; choose from {sorted(BOUNDS)}")
    for d in data:
        if not d.step_time_s > 0:
            raise ValueError(f"measurement {d.label or d.layout.label()}: step time must be > 0, got {d.step_time_s}")
    prior = {k: getattr(cluster.perf, k) for k in knobs}

    def to_x(k: str, v: float) -> float:
        return math.log(max(v, 1e-12)) if BOUNDS[k][2] else v

    def from_x(k: str, x: float) -> float:
        return math.exp(x) if BOUNDS[k][2] else x

    def loss(values: dict[str, float]) -> float:
        c = cluster.with_perf(**values)
        err = sum((math.log(predict(c, d)) - math.log(d.step_time_s)) ** 2 for d in data)
        pull = sum((to_x(k, values[k]) - to_x(k, prior[k])) ** 2 for k in knobs if BOUNDS[k][2])
        return err + prior_weight * pull

    before = _rms(rel_errors(cluster, data))
    values = dict(prior)
    best = loss(values)
    for _ in range(sweeps):
        start = best
        for k in knobs:
            lo, hi, _log = BOUNDS[k]
            xlo, xhi = to_x(k, lo), to_x(k, hi)

            def f1(x: float, k: str = k) -> float:
                return loss({**values, k: from_x(k, x)})

            x = _golden(f1, xlo, xhi)
            cand = {**values, k: from_x(k, x)}
            lc = loss(cand)
            if lc < best:
                values, best = cand, lc
        if start - best < 1e-10:
            break
    fitted_cluster = cluster.with_perf(**values)
    errs = rel_errors(fitted_cluster, data)
    return FitResult(cluster=fitted_cluster, fitted=values, rms_rel_error_before=before,
                     rms_rel_error_after=_rms(errs), rel_errors=tuple(errs))


__all__ = ["Measurement", "FitResult", "fit", "predict", "rel_errors", "BOUNDS", "DEFAULT_FIT"]
