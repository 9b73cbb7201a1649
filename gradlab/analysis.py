"""The numbers experiments read off their results, one copy each. numpy only; never imports jax.

Slopes with their standard errors, the spread of a fitted slope through a random walk, the loss of
the best constant prediction, and final / tail losses with divergence counted as +inf.
"""

from __future__ import annotations

import numpy as np


def slope(x, y) -> float:
    """Least-squares slope of y against x (1-D)."""
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


def slopes(x, y_RxN) -> np.ndarray:
    """Least-squares slope of each row of y against x: shape (rows,)."""
    return np.polyfit(np.asarray(x, float), np.asarray(y_RxN, float).T, 1)[0]


def slope_with_error(x, y) -> tuple[float, float]:
    """Least-squares slope of y against x and its standard error from the residuals
    (sqrt(residual variance / sum (x - mean x)^2), n - 2 degrees of freedom; 0 for 2 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    if len(x) <= 2:
        return float(b), 0.0
    residual = y - (a + b * x)
    variance = np.sum(residual**2) / (len(x) - 2)
    return float(b), float(np.sqrt(variance / np.sum((x - x.mean()) ** 2)))


def seed_slope(x, y_SxN) -> tuple[float, float]:
    """Slope of the mean over seeds (rows) of y against x, and its standard error from the spread of
    the per-seed slopes (std / sqrt(seeds); 0 for one seed)."""
    y = np.asarray(y_SxN, float)
    per_seed = slopes(x, y)
    error = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    return slope(x, y.mean(axis=0)), error


def ols_weights(n: int) -> np.ndarray:
    """a with slope = sum(a * y) for the least-squares line through (0, y_0) .. (n - 1, y_{n-1})."""
    x = np.arange(n) - (n - 1) / 2.0
    return x / np.sum(x**2)


def random_walk_slope_std(n: int) -> float:
    """Std of the least-squares slope through n points of a random walk with unit-variance steps.

    With y_j = sum_{i <= j} e_i the slope is sum_i e_i A_i, A_i = sum_{j >= i} a_j (a the OLS
    weights), so its variance is sum_{i >= 1} A_i^2.
    """
    tail = np.cumsum(ols_weights(n)[::-1])[::-1][1:]
    return float(np.sqrt(np.sum(tail**2)))


def constant_loss(y, task: str, classes: int | None = None) -> float:
    """The loss of the best constant prediction: the mean over outputs of Var(y) for regression
    (mean squared error), the entropy of the label frequencies for classification (cross-entropy)."""
    y = np.asarray(y)
    if task == "classification":
        counts = np.bincount(y.astype(int).ravel(), minlength=classes or 0)
        p = counts[counts > 0] / counts.sum()
        return float(-np.sum(p * np.log(p)))
    y = y.astype(float).reshape(len(y), -1)
    return float(np.mean(np.var(y, axis=0)))


def inf_if_bad(x) -> np.ndarray:
    """x as floats with every non-finite entry (a diverged run) set to +inf, so it ranks last."""
    x = np.asarray(x, float)
    return np.where(np.isfinite(x), x, np.inf)


def nan_if_bad(x) -> np.ndarray:
    """x as floats with every non-finite entry set to NaN: a gap in a drawn line or bar, not a point."""
    x = np.asarray(x, float)
    return np.where(np.isfinite(x), x, np.nan)


def tail_mean(x, tail: int, axis: int = -1) -> np.ndarray:
    """Mean over the last `tail` entries along `axis` (a step axis); non-finite means become +inf."""
    x = np.asarray(x, float)
    last = np.take(x, np.arange(x.shape[axis] - min(tail, x.shape[axis]), x.shape[axis]), axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):
        return inf_if_bad(np.mean(last, axis=axis))


def final(x, diverged=None, tail: int = 1, axis: int = -1) -> np.ndarray:
    """The final value (mean of the last `tail` steps) along a step axis, +inf where the run
    diverged or the value is not finite. `diverged` broadcasts against the result."""
    out = tail_mean(x, tail, axis)
    return out if diverged is None else np.where(np.asarray(diverged, bool), np.inf, out)


def variants(ds, residual_first: bool = False):
    """(name, selection) of each residual x norm variant a result set holds: "plain", "layernorm",
    "residual", "residual+layernorm", ...; norms outer unless `residual_first`."""
    pairs = [(r, n) for r in ds["model.residual"].values for n in ds["model.norm"].values]
    if not residual_first:
        pairs = [(r, n) for n in ds["model.norm"].values for r in ds["model.residual"].values]
    for residual, norm in pairs:
        name = "+".join((["residual"] if residual else []) + ([] if norm == "none" else [str(norm)])) or "plain"
        yield name, {"model.residual": residual, "model.norm": norm}


def reference(ds, name: str) -> np.ndarray:
    """The run-time reference `ref.<name>` of a result set (an experiment's `reference(cfg)`);
    `results.with_axes` leaves these variables with their own dims only."""
    return np.asarray(ds[f"ref.{name}"].values)


def exponential_average(x, start: float, momentum: float) -> np.ndarray:
    """The running average after each step of x (steps on axis 0), a float64 loop:
    s_k = momentum s_{k-1} + (1 - momentum) x_k, s_{-1} = start (BatchNorm's running statistics)."""
    x = np.asarray(x, float)
    out = np.empty(x.shape, float)
    s = np.full(x.shape[1:], start, float)
    for k, value in enumerate(x):
        s = momentum * s + (1.0 - momentum) * value
        out[k] = s
    return out


def moving_average(x, window: int) -> np.ndarray:
    """The running mean over `window` consecutive entries of the last axis (np.convolve's "valid"
    part: window - 1 entries fewer), entry j averaging x[..., j : j + window]."""
    kernel = np.ones(window) / window
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), -1, np.asarray(x, float))


def lr_sensitivity(final, initial: float) -> float:
    """Wortsman et al. 2023's LR sensitivity E_eta[min(L(eta), L0) - L*] over a log-spaced grid of
    rates, divided by L0: `final` the final loss per rate (non-finite: diverged, counted as L0),
    `initial` L0 the loss at initialisation, L* the best capped loss of the grid (as lr_sweep.Curve)."""
    final = np.asarray(final, float)
    capped = np.minimum(np.where(np.isfinite(final), final, initial), initial)
    return float(np.mean(capped - capped.min()) / initial)


def settling_step(x, tol: float) -> int | None:
    """The first index from which x (1-D) stays <= tol to its end: 0 if every entry is, None if the
    last entry is not (above tol, or NaN)."""
    above = np.nonzero(~(np.asarray(x) <= tol))[0]
    if above.size and above[-1] == len(x) - 1:
        return None
    return int(above[-1]) + 1 if above.size else 0


def growth_per_step(x, low: float = 0.0, high: float = np.inf) -> float:
    """(|x_t| / |x_0|)^(1/t) at the last t where |x_t| is finite and within (low, high): the mean
    factor by which |x| grows per step while a float format still holds it (NaN if no such t > 0)."""
    a = np.abs(np.asarray(x, float))
    ok = np.nonzero(np.isfinite(a) & (a > low) & (a < high))[0]
    t = int(ok[-1]) if ok.size else 0
    return float((a[t] / a[0]) ** (1.0 / t)) if t > 0 else float("nan")


def finite_width_bias(widths, crossover: float) -> float:
    """How far below the leading exponent p the fitted log-log slope of a quantity ~ n^p against the
    width n may fall at these widths.

    The change is a sum over the n coordinates of the layer below: a coherent part growing like
    n^p and an incoherent (random-sign) part like n^(p - 1/2); lower terms (an input layer's
    n^(p - 1)) fall off faster still. With the two equal at width `crossover`, RMS^2 ~ n^(2p) (1 +
    crossover / n) or (1 + (crossover / n)^2), whose fitted log-log slope is p minus the larger of
    these two returned values; both corrections only lower the slope.
    """
    n = np.asarray(widths, float)
    return max(-slope(np.log(n), 0.5 * np.log1p((crossover / n) ** k)) for k in (1, 2))


def block_mean(x, k: int) -> np.ndarray:
    """The mean of each run of k consecutive entries along the last axis (..., n // k), in x's dtype;
    a partial run at the end is dropped."""
    x = np.asarray(x)
    n = x.shape[-1] // k
    return x[..., : n * k].reshape(x.shape[:-1] + (n, k)).mean(axis=-1)


def trailing_mean(x, window: int) -> np.ndarray:
    """The mean of each entry and the window - 1 before it along the last axis (of all entries so far
    within the first window), by a cumulative sum in x's dtype; NaN from the first NaN entry on (a
    diverged run)."""
    c = np.cumsum(np.nan_to_num(x, nan=np.inf), axis=-1)
    out = np.empty_like(c)
    with np.errstate(invalid="ignore"):  # inf - inf past a divergence: nan, as it should read
        out[..., :window] = c[..., :window] / np.arange(1, min(window, c.shape[-1]) + 1)
        out[..., window:] = (c[..., window:] - c[..., :-window]) / window
    return np.where(np.isfinite(out), out, np.nan)


def simple_noise_scale(trace_sigma, grad_sq, batch: int) -> float:
    """McCandlish et al. 2018's simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (Eq. 2.8) from
    per-step estimates at batch size B: tr(Sigma) ~ trace_sigma and |G|^2 ~ grad_sq - trace_sigma / B
    (grad_sq = |g_bar|^2, the batch gradient's), as the ratio of their means (App. A.1), NaN skipped."""
    return float(np.nanmean(trace_sigma) / np.nanmean(grad_sq - trace_sigma / batch))
