"""Workload W: a 32-learning-rate sweep of a deep tanh MLP, four ways, each in its own process.

  (a) PyTorch eager, a Python loop over the configs (nn.Sequential, torch.optim.AdamW, clip_grad_norm_)
  (b) PyTorch batched over configs (stacked weights, bmm, a batched AdamW) under torch.compile
  (c) gradlab's engine through its public API (one jit(vmap(scan)) program)
  (d) the machine's fp32 GEMM peak (jax and numpy, the better of the two)

W: X ~ N(0,1) of 256x128, y = sin(X p), p ~ N(0, 1/128); 16 tanh layers of width 128 (the first maps
the 128 inputs), linear readout; weights N(0, 1/fan_in), biases 0; MSE; clip_by_global_norm(1.0) then
AdamW(b1 .9, b2 .999, eps 1e-8, weight decay 1e-4 on weight matrices); 200 steps; 32 learning rates
log-spaced in [1e-4, 1e-1]; every per-step loss kept; all configs start from the same parameters,
which (c) draws and (a), (b) load. FLOPs = 3 x forward matmul FLOPs.

  python benchmarks/sweep_throughput.py              # W on this machine (needs the [bench] extra)
  python benchmarks/sweep_throughput.py --repeats 5  # more rounds (default 3) on a noisy machine
  python benchmarks/sweep_throughput.py --gpu        # W_gpu: 128 lrs, depth 32, width 512, batch 1024
  python benchmarks/sweep_throughput.py --quick      # a tiny W to check the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONTENDED = 0.25  # cores used by other processes during a timed run above which the run is set aside


def busy_seconds() -> float | None:
    """CPU-seconds every core of this machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time of a block, and how many cores other processes kept busy meanwhile.

    Others = (machine busy time - this process's CPU time) / wall time, from /proc/stat; NaN
    where /proc/stat is missing. Time a hypervisor gives to other machines is not seen.
    """

    def __enter__(self):
        self._busy, self._cpu, self._wall = busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._wall
        own = time.process_time() - self._cpu
        busy = busy_seconds()
        self.others = (
            float("nan") if busy is None or self._busy is None else max(0.0, (busy - self._busy - own) / self.seconds)
        )
        return False


def workload(kind: str) -> dict:
    if kind == "gpu":
        return dict(lrs=128, layers=32, width=512, batch=1024, steps=200)
    if kind == "quick":
        return dict(lrs=4, layers=4, width=32, batch=64, steps=20)
    return dict(lrs=32, layers=16, width=128, batch=256, steps=200)


def flops(w: dict) -> float:
    per_step = 2 * w["batch"] * ((w["layers"]) * w["width"] ** 2 + w["width"])
    return 3 * per_step * w["steps"] * w["lrs"]


def learning_rates(w: dict) -> np.ndarray:
    return np.logspace(-4, -1, w["lrs"])


def overrides(w: dict) -> list[str]:
    return [
        f"model.depth={w['layers'] - 1}",
        f"model.width={w['width']}",
        "model.activation=tanh",
        "model.norm=none",
        "model.residual=false",
        "model.init=lecun_normal",
        f"data.examples={w['batch']}",
        f"data.input_dim={w['width']}",
        "data.output_dim=1",
        "optim.name=adamw",
        "optim.b1=0.9",
        "optim.b2=0.999",
        "optim.eps=1e-8",
        "optim.weight_decay=1e-4",
        "optim.clip=global_norm",
        "optim.clip_threshold=1.0",
        f"optim.lr={{logspace: [-4, -1, {w['lrs']}]}}",
        "seeds=1",
        f"steps={w['steps']}",
        f"chunk_steps={w['steps']}",
        "telemetry=loss",
    ]


# ----------------------------------------------------------------------------- contenders


def run_gradlab(w: dict, shared: Path) -> dict:
    import jax

    import gradlab
    from gradlab import config, data, models
    from gradlab.experiments import gradient_flow

    spec = config.load("gradient_flow", gradient_flow.Config, overrides(w))
    cfg = spec.config
    k_params, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))  # as trials.supervised_mlp's init does
    params = models.init(
        k_params, models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, 1), models.MLPHyper.from_config(cfg.model)
    )
    task = data.make(cfg.data)
    np.savez(
        shared,
        x=np.asarray(task.x),
        y=np.asarray(task.y),
        w_in=np.asarray(params["input"]["w"]),
        w_hidden=np.asarray(params["hidden"]["w"]),
        w_out=np.asarray(params["output"]["w"]),
    )
    with tempfile.TemporaryDirectory() as out, Stopwatch() as watch:
        outcome = gradlab.execute("gradient_flow", overrides(w), out=out, progress=False, draw=False)
    ds = outcome.dataset
    return dict(
        seconds=float(ds.attrs["run_seconds"]),
        compile=float(ds.attrs["compile_seconds"]),
        others=watch.others,
        losses=ds["loss"].transpose("optim.lr", "step").values.tolist(),
        device=f"{ds.attrs['device_count']} x {ds.attrs['device_kind']}",
    )


def _torch_setup(shared: Path):
    import torch

    torch.manual_seed(0)
    arrays = np.load(shared)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    weights = [to(arrays["w_in"])] + [to(a) for a in arrays["w_hidden"]] + [to(arrays["w_out"])]
    return to(arrays["x"]), to(arrays["y"]), weights


def run_torch_loop(w: dict, shared: Path) -> dict:
    import torch

    x, y, weights = _torch_setup(shared)
    losses = []
    with Stopwatch() as watch:
        for lr in learning_rates(w):
            layers = []
            for i, wt in enumerate(weights):
                linear = torch.nn.Linear(wt.shape[0], wt.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(wt.T)
                    linear.bias.zero_()
                layers += [linear] + ([torch.nn.Tanh()] if i < len(weights) - 1 else [])
            net = torch.nn.Sequential(*layers)
            decay = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
            keep = [m.bias for m in net if isinstance(m, torch.nn.Linear)]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": 1e-4}, {"params": keep, "weight_decay": 0.0}],
                lr=float(lr),
                betas=(0.9, 0.999),
                eps=1e-8,
            )
            curve = []
            for _ in range(w["steps"]):
                opt.zero_grad(set_to_none=True)
                loss = torch.mean((net(x) - y) ** 2)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                curve.append(loss.item())
            losses.append(curve)
    return dict(seconds=watch.seconds, compile=0.0, others=watch.others, losses=losses, device="cpu (torch eager)")


def run_torch_batched(w: dict, shared: Path) -> dict:
    import torch

    x, y, weights = _torch_setup(shared)
    n = w["lrs"]
    lr = torch.tensor(learning_rates(w), dtype=torch.float32).view(n, 1, 1)
    params = [wt.unsqueeze(0).repeat(n, 1, 1).contiguous() for wt in weights]
    params += [torch.zeros(n, 1, wt.shape[1]) for wt in weights]
    for p in params:
        p.requires_grad_(True)
    decays = [1e-4] * len(weights) + [0.0] * len(weights)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    xb, yb = x.unsqueeze(0).expand(n, -1, -1), y.unsqueeze(0).expand(n, -1, -1)
    k = len(weights)

    def loss_fn(params):
        h = xb
        for i in range(k):
            h = torch.baddbmm(params[k + i], h, params[i])
            if i < k - 1:
                h = torch.tanh(h)
        return torch.mean((h - yb) ** 2, dim=(1, 2))

    def step(params, m, v, t):
        per_config = loss_fn(params)
        grads = torch.autograd.grad(per_config.sum(), params)
        norm = torch.sqrt(sum(torch.sum(g * g, dim=(1, 2)) for g in grads)).view(n, 1, 1)
        scale = torch.clamp(1.0 / norm, max=1.0)
        with torch.no_grad():
            for p, g, mi, vi, wd in zip(params, grads, m, v, decays):
                g = g * scale
                mi.mul_(0.9).add_(g, alpha=0.1)
                vi.mul_(0.999).addcmul_(g, g, value=0.001)
                update = (mi / (1 - 0.9**t)) / (torch.sqrt(vi / (1 - 0.999**t)) + 1e-8) + wd * p
                p.sub_(lr * update)
        return per_config.detach()

    compiled = torch.compile(step)
    start = time.perf_counter()
    compiled(params, m, v, torch.tensor(1.0))  # compile and warm up, then restart from the shared start
    compile_seconds = time.perf_counter() - start
    x, y, weights = _torch_setup(shared)
    with torch.no_grad():
        for i, wt in enumerate(weights):
            params[i].copy_(wt.unsqueeze(0).expand(n, -1, -1))
            params[k + i].zero_()
        for buf in m + v:
            buf.zero_()
    curves = []
    with Stopwatch() as watch:
        for t in range(1, w["steps"] + 1):
            curves.append(compiled(params, m, v, torch.tensor(float(t))))
        losses = torch.stack(curves, dim=1).tolist()
    return dict(
        seconds=watch.seconds, compile=compile_seconds, others=watch.others, losses=losses, device="cpu (torch.compile)"
    )


def run_peak(w: dict, shared: Path) -> dict:
    import jax
    import jax.numpy as jnp

    del w, shared
    size = 2048
    best = 0.0
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    mm = jax.jit(jnp.matmul)
    ja = jnp.asarray(a)
    mm(ja, ja).block_until_ready()
    for _ in range(5):
        start = time.perf_counter()
        mm(ja, ja).block_until_ready()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
        start = time.perf_counter()
        a @ a
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return dict(gflops=best / 1e9)


CONTENDERS = {
    "gradlab": run_gradlab,
    "torch_loop": run_torch_loop,
    "torch_batched": run_torch_batched,
    "peak": run_peak,
}


def child_env(name: str) -> dict:
    """gradlab's compiles are timed, so its process keeps no compilation cache."""
    env = os.environ.copy()
    if name == "gradlab":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # gradlab.runtime leaves a disabled cache alone
    return env


def child(name: str, kind: str, shared: Path, out: Path) -> None:
    if name in ("gradlab", "peak"):  # jax as `gradlab run` sets it up: XLA flags, host devices
        from gradlab import runtime

        runtime.setup(cache=False)
    result = CONTENDERS[name](workload(kind), shared)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(result))


def summarize(runs: list[dict]) -> dict:
    """Min and median run time over the repeats that ran alone (all of them if none did)."""
    alone = [r for r in runs if not r["others"] > CONTENDED]
    kept = alone or runs
    times = sorted(r["seconds"] for r in kept)
    return dict(
        best=times[0],
        median=float(np.median(times)),
        kept=len(kept),
        runs=len(runs),
        compile=min(r["compile"] for r in runs),
        peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
        losses=runs[-1]["losses"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="rounds of every contender, each in a fresh process (default 3)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=list(CONTENDERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kind = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    if args.child:
        child(args.child, kind, Path(args.shared), Path(args.result))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    w = workload(kind)
    total = flops(w)
    print(f"workload {kind}: {w}; {total / 1e12:.3f} TFLOP (3 x forward matmuls); {args.repeats} round(s)")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared.npz"
        order = ["gradlab", "peak", "torch_loop", "torch_batched"]  # gradlab writes the shared start
        flags = ["--gpu"] if args.gpu else ["--quick"] if args.quick else []
        # Rounds rather than back-to-back repeats, so that a slow spell of a shared machine
        # falls on every contender alike.
        for round_ in range(args.repeats):
            for name in order:
                if name in args.skip:
                    continue
                result_file = Path(tmp) / f"{name}.json"
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        *flags,
                        "--child",
                        name,
                        "--shared",
                        str(shared),
                        "--result",
                        str(result_file),
                    ],
                    env=child_env(name),
                )
                if proc.returncode != 0:
                    print(f"{name}: failed (exit {proc.returncode})")
                    continue
                result = json.loads(result_file.read_text())
                runs.setdefault(name, []).append(result)
                if "seconds" in result:
                    print(
                        f"  round {round_ + 1}: {name} {result['seconds']:.2f} s, other processes "
                        f"kept {result['others']:.2f} cores busy",
                        flush=True,
                    )
    peak = max((r["gflops"] for r in runs.get("peak", [])), default=float("nan"))
    results = {name: summarize(r) for name, r in runs.items() if name != "peak"}
    print(f"\nrun s: best and median of the rounds in which other processes kept under {CONTENDED} cores busy")
    print(
        f"{'contender':<16}{'best s':>9}{'median s':>10}{'rounds':>8}{'compile s':>11}{'GFLOP/s':>10}"
        f"{'of peak':>9}{'peak RSS MiB':>14}"
    )
    for name in ("torch_loop", "torch_batched", "gradlab"):
        if name in results:
            r = results[name]
            rate = total / r["best"] / 1e9
            print(
                f"{name:<16}{r['best']:>9.2f}{r['median']:>10.2f}{r['kept']:>4}/{r['runs']:<3}{r['compile']:>11.1f}"
                f"{rate:>10.1f}{rate / peak:>9.0%}{r['peak_rss_mib']:>14.0f}"
            )
    print(f"{'fp32 GEMM peak':<16}{'':>38}{peak:>10.1f}")
    if "gradlab" in results:
        g = results["gradlab"]
        for name, label in (("torch_loop", "(a)/(c)"), ("torch_batched", "(b)/(c)")):
            if name in results:
                r = results[name]
                print(
                    f"speed-up of gradlab over {name} {label}: {r['best'] / g['best']:.2f}x best to best, "
                    f"{r['median'] / g['median']:.2f}x median to median"
                )
        ref = np.asarray(g["losses"])
        for name in ("torch_loop", "torch_batched"):
            if name in results:
                other = np.asarray(results[name]["losses"])
                # float32 rounding grows along a trajectory, fast at large lr (AdamW's sign-like first
                # steps), so the curves are compared where they should agree: early, and at small lr.
                rel = np.abs(other - ref) / np.abs(ref)
                low = slice(0, w["lrs"] // 2)
                print(
                    f"loss curves, {name} vs gradlab, max relative difference: {rel[low, :10].max():.1e} over the "
                    f"first 10 steps of the low-lr half, {rel[0].max():.1e} over the whole curve at lr "
                    f"{learning_rates(w)[0]:.0e}, {np.median(rel[low].max(axis=1)):.1e} median over the low-lr half; "
                    f"final losses agree to {np.median(rel[:, -1]):.1e} (median over all lrs)"
                )


if __name__ == "__main__":
    main()
