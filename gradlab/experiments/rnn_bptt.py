"""C4: vanishing gradients through time in a vanilla RNN, an LSTM and a GRU (Flax cells).

A sequence x_0 .. x_{T-1} of N(0, I) vectors is read by a recurrent cell (flax.linen SimpleCell,
LSTMCell or GRUCell under nn.RNN, i.e. lax.scan) and the last output h_{T-1} is read out; the task
is to recall the sign of the first input's first feature, so the loss sits at the last step and the
only useful signal is T - 1 steps away. Recorded at every training step, before the update, is
||dl/dx_t|| (RMS over the batch of each example's loss gradient w.r.t. its input at time t) against
the distance k = T - 1 - t to the loss.

For the vanilla cell h_t = tanh(a_t), a_t = U x_t + W h_{t-1} + b, back-propagation through one step
multiplies by W^T D_t with D_t = diag(tanh'(a_t)) = diag(1 - h_t^2), so
  upper bound:  ln||dl/dx_t|| falls per step by at most  ln||W||_2 + ln max_i |tanh'(a_{t,i})|;
  mean field:   for W = gain x orthogonal and a back-propagated vector independent of D_t,
                E||W^T D v||^2 = gain^2 mean_i(tanh'^2) ||v||^2, a log-slope per step of
                ln gain + (1/2) ln mean(tanh'(a)^2)   (< 0: vanishing).
LSTM and GRU carry a path whose per-step factor is a gate (the forget gate f, GRU's z), which
training can hold near 1; `forget_bias` is added to the LSTM's forget-gate bias at init
(1.0 as Jozefowicz et al. 2015; flax's default is 0). A linear cell with W = gain x orthogonal and
orthogonal U gives ||dl/dx_t|| = gain^k ||dl/dh_{T-1}|| exactly (tests/test_rnn.py).

One compile per cell: the sequence length (a mask: the program runs the longest and reads h at
T - 1), learning rate, clipping threshold and seed are vmapped, and flax's init runs under vmap
with each point's key. The recurrent kernels are drawn by inits.orthogonal and ||W||_2 is taken
by telemetry.spectral_norm, both free of LAPACK (errors.LapackOnCpuWarning says why).
`optim.clip: global_norm` with a threshold of 1e30 or more is no clipping:
optax.clip_by_global_norm returns the gradient untouched when its norm is below the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, results, rnn, telemetry, transforms
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "rnn_bptt"
CLAIM = "||dL/dx_t|| decays exponentially in T - t for a tanh RNN at the mean-field rate; gated cells decay slower"
AXES = ["cell", "seq_len", "optim.lr", "optim.clip_threshold", "seed"]
FIT_SKIP = 1  # lags left out of the slope fit: lag 0 also reaches the loss through the readout directly


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the recurrent model and its task (model.* and data.* are not used)."""

    cell: str = param("simple", choices=tuple(rnn.CELLS), doc="flax.linen cell: SimpleCell, LSTMCell, GRUCell")
    seq_len: int = param(32, low=2, sweep="max", doc="sequence length T (a mask: one program for the longest)")
    hidden: int = param(32, low=1, doc="cell features")
    features: int = param(4, low=1, doc="input features per time step")
    batch: int = param(32, low=1, doc="fresh sequences per step")
    recurrent_gain: float = param(1.0, low=0.0, doc="multiplies the recurrent kernels (flax: orthogonal) at init")
    forget_bias: float = param(1.0, doc="added to the LSTM forget-gate bias at init (flax default 0)")


class State(NamedTuple):
    params: optax.Params
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def trial(cfg) -> Trial:
    """Train the config's cell on the recall task; every step records (before the update) loss,
    accuracy, grad_global_norm (before clipping) and per lag k: grad_x_norm; for the vanilla cell also
    dtanh_sq and dtanh_4th (means of tanh'(a)^2 and ^4), log_max_dtanh (batch mean of ln max_i tanh'(a_i)) and
    recurrent_norm (||W||_2)."""
    model = rnn.SequenceClassifier(cfg.cell, cfg.hidden)
    steps_max = cfg.seq_len  # the program's length: the largest of the sweep (a `max` field)

    def init(hp, key):
        k_params, k_data = jax.random.split(key)
        example = jnp.zeros((cfg.batch, steps_max, cfg.features))
        params = rnn.init_params(model, k_params, example, hp["seq_len"], hp["recurrent_gain"], hp["forget_bias"])
        opt_state = transforms.build(cfg.optim, hp, cfg.steps).init(params)
        return State(params, opt_state, k_data, jnp.int32(0))

    def step(hp, state):
        length = hp["seq_len"]
        xs, labels = rnn.task_batch(jax.random.fold_in(state.key, state.step), cfg.batch, steps_max, cfg.features)
        loss, logits, outs, grads, grad_x_norm = rnn.loss_and_grads(model, state.params, xs, labels, length)
        tx = transforms.build(cfg.optim, hp, cfg.steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(((logits > 0) == (labels > 0)).astype(jnp.float32)),
            "grad_global_norm": telemetry.global_norm(grads),
            "grad_x_norm": grad_x_norm,
        }
        if cfg.cell == "simple":  # SimpleCell's output is h = tanh(a)
            metrics.update(rnn.tanh_derivatives_by_lag(outs, length))
            metrics["recurrent_norm"] = telemetry.spectral_norm(state.params["cell"]["h"]["kernel"])
        return State(params, opt_state, state.key, state.step + 1), metrics

    lag = ("lag",)
    return Trial(init, step, {"grad_x_norm": lag, "dtanh_sq": lag, "dtanh_4th": lag, "log_max_dtanh": lag})


# ----------------------------------------------------------------------------- analysis (host, numpy)


def profile(ds, cell: str, step: int) -> np.ndarray:
    """grad_x_norm at `step`: (seq_len, lr, clip, seed, lag)."""
    point = ds["grad_x_norm"].sel(cell=cell).isel(step=step)
    return point.transpose("seq_len", "optim.lr", "optim.clip_threshold", "seed", "lag").values.astype(float)


def fit_slope(norms_K, length: int) -> float:
    """Least-squares slope of ln ||dl/dx|| against lag k over FIT_SKIP <= k < length (finite, > 0 only)."""
    k = np.arange(norms_K.shape[-1])
    keep = (k >= FIT_SKIP) & (k < length) & np.isfinite(norms_K) & (norms_K > 0)
    if keep.sum() < 2:
        return float("nan")
    return analysis.slope(k[keep], np.log(norms_K[keep]))


def slopes(ds, cell: str, step: int) -> np.ndarray:
    """Fitted log-slope per step, (seq_len, lr, clip, seed)."""
    prof = profile(ds, cell, step)
    lengths = ds["seq_len"].values
    out = np.full(prof.shape[:-1], np.nan)
    for idx in np.ndindex(out.shape):
        out[idx] = fit_slope(prof[idx], int(lengths[idx[0]]))
    return out


def simple_theory(ds, hidden: int, step: int = 0) -> dict:
    """For the vanilla cell at `step`, over (seq_len, lr, clip, seed): the mean-field slope
    ln||W||_2 + (1/2) ln mean tanh'^2 and the bound ln||W||_2 + mean ln max tanh', both averaged over
    the fitted lags; and jensen_gap, Var(tanh'^2) / (2 N mean(tanh'^2)^2) (see slope_tolerance)."""
    d = ds.sel(cell="simple").isel(step=step)
    at = lambda var, *lag: d[var].transpose("seq_len", "optim.lr", "optim.clip_threshold", "seed", *lag).values
    dsq, lmax, d4 = (at(var, "lag").astype(float) for var in ("dtanh_sq", "log_max_dtanh", "dtanh_4th"))
    norm = np.log(at("recurrent_norm").astype(float))
    window = np.arange(dsq.shape[-1]) >= FIT_SKIP
    with np.errstate(all="ignore"):
        mean_field = norm + 0.5 * np.log(np.nanmean(dsq[..., window], axis=-1))
        bound = norm + np.nanmean(lmax[..., window], axis=-1)
        gap = np.nanmean((d4 - dsq**2)[..., window] / (2 * hidden * dsq[..., window] ** 2), axis=-1)
    return {"mean_field": mean_field, "bound": bound, "jensen_gap": gap}


def slope_tolerance(jensen_gap, batch: int, fitted_lags: int):
    """|measured - mean field| allowed per step, from the per-step factor X = |D v|^2 / |v|^2 with
    v uniform on the sphere: E X = m = mean tanh'^2 (the mean field), Var X ~ 2 s^2 / N with
    s^2 = Var_i tanh'^2. So
      bias:   E ln sqrt(X) - ln sqrt(E X) ~ -Var X / (4 m^2) = -s^2 / (2 N m^2) = -jensen_gap; the batch
              RMS lies between E ln and ln E, so the bias is at most the gap;
      noise:  ln sqrt(X) has variance ~ jensen_gap per step and example; the RMS over `batch` examples
              divides it by batch; a fitted slope of such a walk over n lags has std
              analysis.random_walk_slope_std(n) sqrt(jensen_gap / batch).
    tolerance = gap + 3 x noise std."""
    noise = analysis.random_walk_slope_std(fitted_lags) * np.sqrt(np.asarray(jensen_gap) / batch)
    return np.asarray(jensen_gap) + 3 * noise


class Vanilla(NamedTuple):
    """The vanilla cell at init against its mean field and the operator-norm bound."""

    slope: float  # max over seeds at the longest T (< 0: vanishing)
    mean_field_error: float  # |slope - mean field| at the (T, seed) worst relative to its tolerance
    mean_field_tolerance: float  # Jensen gap + 3 sd there
    worst_length: int
    worst_mean_field: float
    bound_margin: float  # min of bound - slope (>= 0: the operator-norm bound holds)
    bound_mean: float


class Measured(NamedTuple):
    cells: list
    lengths: np.ndarray
    slopes: dict  # {(cell, step): fitted log-slope per step, (seq_len, lr, clip, seed)}, at init and the last step
    mean_field: np.ndarray | None  # vanilla cell at init: ln||W|| + 0.5 ln mean tanh'^2, same shape
    vanilla: Vanilla | None = None  # None without the vanilla cell
    lstm_margin: float | None = None  # min over lengths of the median LSTM - vanilla slope difference


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    cells = [str(c) for c in ds["cell"].values]
    lengths = ds["seq_len"].values.astype(int)
    last = ds.sizes["step"] - 1
    fitted = {(cell, step): slopes(ds, cell, step) for cell in cells for step in (0, last)}
    if "simple" not in cells:
        return Measured(cells, lengths, fitted, None)
    measured = fitted["simple", 0]
    theory = simple_theory(ds, cfg["hidden"], 0)
    tol = np.stack(
        [slope_tolerance(theory["jensen_gap"][j], cfg["batch"], int(T) - FIT_SKIP) for j, T in enumerate(lengths)]
    )
    error = np.abs(measured - theory["mean_field"])
    worst = np.unravel_index(int(np.nanargmax(error / tol)), error.shape)
    vanilla = Vanilla(
        slope=float(np.nanmax(measured[-1])),
        mean_field_error=float(error[worst]),
        mean_field_tolerance=float(tol[worst]),
        worst_length=int(lengths[worst[0]]),
        worst_mean_field=float(theory["mean_field"][worst]),
        bound_margin=float(np.nanmin(theory["bound"][-1] - measured[-1])),
        bound_mean=float(np.nanmean(theory["bound"][-1])),
    )
    lstm_margin = None
    if "lstm" in cells:  # GRU's slope is reported in the figure, not checked (measured: close to vanilla)
        # the same seeds, lengths and (irrelevant at init) lr / clip: compare the medians per length
        lstm_margin = float(np.nanmin(np.nanmedian(fitted["lstm", 0] - measured, axis=(1, 2, 3))))
    return Measured(cells, lengths, fitted, theory["mean_field"], vanilla, lstm_margin)


def checks(m: Measured) -> list[Check]:
    v = m.vanilla
    if v is None:
        return []
    out = [
        Check.below(f"vanilla RNN at init, T = {m.lengths[-1]}: log-slope per step (max over seeds)", v.slope, 0.0),
        Check.at_most(
            f"vanilla RNN at init: worst |slope - (ln||W|| + 0.5 ln mean tanh'^2)| over lengths, seeds "
            f"(T = {v.worst_length}, mean field {v.worst_mean_field:.3f})",
            v.mean_field_error,
            v.mean_field_tolerance,
            "Jensen gap + 3 sd",
        ),
        Check.at_least(
            f"vanilla RNN at init: bound ln||W|| + mean ln max tanh' ({v.bound_mean:.3f}) - slope", v.bound_margin, 0.0
        ),
    ]
    if m.lstm_margin is not None:
        lstm, vanilla = np.nanmedian(m.slopes["lstm", 0][-1]), np.nanmedian(m.slopes["simple", 0][-1])
        name = (
            f"lstm decays slower than the vanilla RNN at init: min over lengths of slope "
            f"difference (lstm median {lstm:.3f}, vanilla {vanilla:.3f})"
        )
        out.append(Check.above(name, m.lstm_margin, 0.0))
    return out


def figures(ds, m: Measured) -> dict:
    """Gradient against distance per cell, and the training curves (gradlab/experiments/_rnn_bptt_figures.py)."""
    from gradlab.experiments import _rnn_bptt_figures

    return _rnn_bptt_figures.draw(ds, m)
