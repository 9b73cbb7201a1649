"""init_schemes' figures, from its stored results and Measured numbers (numpy and matplotlib only):
each scheme's per-layer activation std, back-propagated gradient and weight gradient at init, and
the training curves of a deep ReLU net with the zero-init symmetry panel (`init_schemes_training`)."""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib.lines import Line2D

from gradlab import analysis, datasets, plotting, results
from gradlab.experiments import init_schemes as M

COLOR = dict(
    zip(M.SCHEMES, ["0.35", "#8d6a9f", "#a05a2c", "#edae49", "#66a182", "#1b6ca8", "#00798c", "#d1495b", "#2e4057"])
)
MARKER = dict(zip(M.SCHEMES, ["o", "s", "^", "D", "v", "P", "X", "*", "h"]))  # no scheme by colour alone
ROWS = (
    ("act_std", "activation std"),
    ("delta_rms", r"RMS of $\partial L/\partial h_l$"),
    ("grad_norm", r"$\|\partial L/\partial W_l\|_F$"),
)
SHORT = {"he_normal": "He", "xavier_normal": "Xavier", "standard": "standard", "xavier_uniform": "normalized"}


def _mark(line, scheme):
    """The scheme's marker on its line, a few per curve."""
    line.set_marker(MARKER[str(scheme)])
    line.set_markevery(plotting.sparse_marks(line, 8))
    line.set_markersize(4)
    return line


def _profiles_figure(ds, m: M.Measured):
    acts = list(ds["model.activation"].values)
    fig, axes = plotting.figure(
        len(ROWS) + 1,
        len(acts),
        width=max(3.4, 7.0 / len(acts)),
        height=2.3,
        sharex="col",
        gridspec_kw={"height_ratios": [0.3] + [1] * len(ROWS)},
    )
    hidden = ds["layer"].values[:-1]  # the readout (one output) is left out
    for col, activation in enumerate(acts):
        for row, (var, ylabel) in enumerate(ROWS, start=1):
            ax = axes[row, col]
            for scheme in ds["scheme"].values:
                point = ds[var].sel({"model.activation": activation, "scheme": scheme}).isel(optimizer=0, step=0)
                values = analysis.nan_if_bad(point.transpose("seed", "layer").values[:, :-1])
                if np.any(values > 0):  # zero init: exactly 0, nothing to draw on a log axis
                    _mark(plotting.band(ax, hidden, values, str(scheme), color=COLOR[str(scheme)]), scheme)
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, 1e-20), min(hi, 1e20))
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == len(ROWS):
                ax.set_xlabel("layer l (0 = input projection)")
        lines = [
            f"{SHORT[s]}: {m.profile[(a, s)][0]:+.3f}  (mean field {round(m.profile[(a, s)][1], 3) + 0.0:+.3f})"
            for a, s, _ in M.PROFILE_CHECKS
            if a == activation and (a, s) in m.profile
        ]
        head = axes[0, col]
        head.axis("off")
        head.set_title(activation)
        text = ["slope of ln E[h^2] per layer:"] + lines if lines else []
        if "zero" in ds["scheme"].values:
            text.append(
                "zero: h = 0 everywhere (off the log axes)"
                if activation != "sigmoid"
                else "zero: all units = 1/2 (std 0, not drawn)"
            )
        plotting.note(head, "\n".join(text))
        for t in head.texts:
            t.set_in_layout(False)  # the box may be wider than its (empty) axes
    handles = {str(s): Line2D([], [], color=COLOR[str(s)], marker=MARKER[str(s)]) for s in ds["scheme"].values}
    fig.legend(handles.values(), handles.keys(), loc="outside right center", frameon=False)
    fig.suptitle(
        f"At initialization (Glorot & Bengio 2010): {m.layers} layers x {m.width}, {m.seeds} seeds; "
        f"inputs: {datasets.title(results.run_config(ds)['data']['task'])}",
        fontsize=10,
    )
    return fig


def _training_figure(ds, m: M.Measured):
    cfg = results.run_config(ds)
    opts = [o for o in M.OPTIMIZERS if o in ds["optimizer"].values]
    zero = "zero" in ds["scheme"].values
    fig, axes = plotting.figure(1, len(opts) + zero, width=3.5, height=3.0)
    steps = ds["step"].values
    for col, optimizer in enumerate(opts):
        ax = axes[0, col]
        for scheme in ds["scheme"].values:
            loss = ds["loss"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme})
            line = plotting.band(
                ax,
                steps,
                analysis.nan_if_bad(loss.transpose("seed", "step").values),
                str(scheme),
                color=COLOR[str(scheme)],
            )
            _mark(line, scheme).set_linewidth(2.2 if scheme in ("xavier_normal", "he_normal") else 0.9)
        ax.axhline(m.constant_loss, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(max(ax.get_ylim()[0], 1e-6), 10 * m.constant_loss)
        lr = cfg["optim"]["lr"] if optimizer == "momentum" else cfg["adam_lr"]
        ax.set_title(f"{'SGD + momentum' if optimizer == 'momentum' else 'Adam'}, lr {lr:g}")
        ax.set_xlabel("step")
        text = [
            f"{SHORT[s]}: final / constant = {m.final_ratio[(optimizer, s)]:.2g}"
            + (f", test acc. {_test_accuracy(ds, optimizer, s):.0%}" if "test_accuracy" in ds else "")
            for s in ("xavier_normal", "he_normal")
            if s in ds["scheme"].values
        ]
        plotting.note(ax, "\n".join(["dashed: best constant prediction"] + text), loc="lower left")
    axes[0, 0].set_ylabel(f"training loss, {m.layers}-layer ReLU net")
    if zero:  # zero init's symmetry: the spread across units of each layer's incoming weights
        ax = axes[0, -1]
        activation = "sigmoid" if "sigmoid" in ds["model.activation"].values else "relu"
        for scheme in ds["scheme"].values:
            spread = ds["unit_spread_after"].sel({"model.activation": activation, "scheme": scheme})
            spread = spread.isel(optimizer=0, step=-1).transpose("seed", "layer").values[:, :-1]
            line = plotting.band(
                ax,
                ds["layer"].values[:-1],
                analysis.nan_if_bad(spread),
                str(scheme),
                color=COLOR[str(scheme)],
                log=False,
            )
            _mark(line, scheme)
        ax.set_ylim(-0.05, 1.75)
        ax.set_title(f"{activation}: after {m.steps} steps")
        ax.set_xlabel("layer l (0 = input projection)")
        ax.set_ylabel("unit spread |W - mean column| / |W|")
        text = [f"max unit spread after {m.steps} updates: {m.zero_spread:.2g}"]
        if m.zero_sigmoid_moved is not None:
            text.append(f"largest hidden |W| after training: {m.zero_sigmoid_moved:.2g}")
        plotting.note(ax, "\n".join(text), loc="upper right")
    plotting.legend_outside(fig, axes[0, 0])
    fig.suptitle(
        "Training from each init (He et al. 2015, Fig. 3)"
        + ("; zero init stays symmetric" if zero else "")
        + f"\non {datasets.title(cfg['data']['task'])}, batch {_batch(cfg)}",
        fontsize=10,
    )
    return fig


def _batch(cfg) -> str:
    size, n = cfg["data"]["batch_size"], cfg["data"]["examples"]
    return f"{size} of {n}" if 0 < size < n else f"{n} (full)"


def _test_accuracy(ds, optimizer: str, scheme: str) -> float:
    """The ReLU net's median over seeds of the test accuracy of the last steps, whose test slices
    (data.eval_slice) cover the test split once."""
    cfg = results.run_config(ds)
    size, n = cfg["data"]["batch_size"], cfg["data"]["examples"]
    test = datasets.SHAPES[cfg["data"]["task"]].test
    last = -(-test // size) if 0 < size < n else 1
    acc = ds["test_accuracy"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme})
    return float(np.median(acc.isel(step=slice(-last, None)).mean("step").values))


def draw(ds, m: M.Measured) -> dict:
    """{"": the profiles at init, "training": the training curves (with ReLU and more than one step)}."""
    with warnings.catch_warnings():  # diverged runs are all-NaN after their first bad step
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        figs = {"": _profiles_figure(ds, m)}
        if "relu" in ds["model.activation"].values and m.steps > 1:
            figs["training"] = _training_figure(ds, m)
    return figs
