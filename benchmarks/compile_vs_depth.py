"""Compile time and run time of workload W's training program against depth and scan unroll.

Hidden layers under lax.scan keep compile time nearly flat in depth; straight-line layers
(model.unroll >= depth, "full" below) compile in time that grows with depth and run faster,
because a scan stacks every layer's residuals for the backward pass. For depths 8, 16, 32, 64
and several unroll factors this prints the compile and run seconds of W's sweep (32 learning
rates, 200 steps, width 128) and the two ratios of each scan unroll: compile(64) / compile(8)
(target within 2x) and its run time against straight-line layers (target within 10 %).
model.unroll's default, 0, picks straight-line layers up to depth 16 and a scan of one layer
beyond (models.auto_unroll).

  python benchmarks/compile_vs_depth.py            # depths 8 16 32 64, unroll 1 2 4 full
  python benchmarks/compile_vs_depth.py --steps 50 --lrs 8    # faster, noisier
  python benchmarks/compile_vs_depth.py --depths 15 --unrolls 0 --steps 25 --telemetry layers
                                                              # W's step with per-layer telemetry
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from gradlab import config, engine, runtime
from gradlab.experiments import gradient_flow
from gradlab.trials import supervised_mlp


def measure(
    depth: int, unroll: int, lrs: int, steps: int, repeats: int, telemetry: str = "loss"
) -> tuple[float, float]:
    overrides = [
        f"model.depth={depth}",
        f"model.unroll={unroll}",
        "model.width=128",
        "model.activation=tanh",
        "model.norm=none",
        "model.residual=false",
        "data.examples=256",
        "data.input_dim=128",
        "optim.name=adamw",
        "optim.weight_decay=1e-4",
        "optim.clip=global_norm",
        "optim.clip_threshold=1.0",
        f"optim.lr={{logspace: [-4, -1, {lrs}]}}",
        "seeds=1",
        f"steps={steps}",
        f"chunk_steps={steps}",
        f"telemetry={telemetry}",
    ]
    spec = config.load("gradient_flow", gradient_flow.Config, overrides)
    (group,) = config.plan(spec).groups
    devices = jax.local_devices()
    compiled = engine.compile_group(supervised_mlp(group.config), group.hp, steps, steps, devices)
    times = []
    for _ in range(repeats):
        seconds = 0.0
        for b in range(compiled.batches):  # one batch unless the group did not fit in memory
            hp = compiled.hp(b)
            carry = compiled.init(hp)
            jax.block_until_ready(carry)
            start = time.perf_counter()
            out = compiled.chunk(hp, carry, np.int32(0))
            jax.block_until_ready(out)
            seconds += time.perf_counter() - start
        times.append(seconds)
    return compiled.compile_seconds, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument(
        "--unrolls", type=int, nargs="+", default=[1, 2, 4, 0], help="0: straight-line layers (unroll = depth)"
    )
    parser.add_argument("--lrs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--telemetry",
        choices=["loss", "layers"],
        default="loss",
        help="what each step records (layers: gradlab's per-layer statistics, the experiments' default)",
    )
    args = parser.parse_args()
    runtime.setup(cache=False)  # XLA as `gradlab run` sets it up; no cache, since compiles are timed
    print(
        f"device: {jax.local_devices()[0].device_kind} x {len(jax.local_devices())}; "
        f"{args.lrs} lrs x {args.steps} steps, width 128, telemetry={args.telemetry}, median of {args.repeats} runs"
    )
    print(f"{'depth':>6}{'unroll':>8}{'compile s':>11}{'run s':>9}")
    table = {}
    for depth in args.depths:
        for unroll in args.unrolls:
            u = unroll or depth
            table[depth, unroll] = measure(depth, u, args.lrs, args.steps, args.repeats, args.telemetry)
            print(
                f"{depth:>6}{('full' if unroll == 0 else unroll):>8}{table[depth, unroll][0]:>11.2f}"
                f"{table[depth, unroll][1]:>9.2f}",
                flush=True,
            )
    lo, hi = min(args.depths), max(args.depths)
    for unroll in args.unrolls:
        growth = table[hi, unroll][0] / table[lo, unroll][0]
        if unroll == 0:
            print(f"full: compile({hi}) / compile({lo}) = {growth:.2f}")
            continue
        slower = max(table[d, unroll][1] / table[d, 0][1] for d in args.depths) if 0 in args.unrolls else float("nan")
        print(
            f"unroll {unroll}: compile({hi}) / compile({lo}) = {growth:.2f} (target <= 2); "
            f"worst run time vs fully unrolled = {slower:.2f} (target <= 1.10)"
        )


if __name__ == "__main__":
    main()
