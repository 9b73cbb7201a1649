"""Where workload W's time goes: XLA's per-operation times from a jax.profiler trace.

Compiles W's sweep program as `gradlab run` does (32 learning rates of a 16-layer tanh MLP, clipped
AdamW, width 128, batch 256), times `--repeats` untraced runs of one chunk, then runs it once under
`jax.profiler.trace` and sums the duration of every XLA operation in the trace by kind: the dots
(XLA:CPU's matrix multiplies), each fusion, copies, reductions. The operations' sum can exceed the
chunk's wall time where the runtime runs independent operations side by side.

  python benchmarks/profile_step.py                 # 50 steps (a trace of ~700k events)
  python benchmarks/profile_step.py --steps 20 --top 20

Keep --steps small: the profiler keeps about a million events and silently drops the rest
(200 steps of W on jaxlib 0.10.2 kept a third of its dots).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import sweep_throughput  # noqa: E402  (W's definition, shared with the throughput benchmark)

from gradlab import config, engine, runtime  # noqa: E402
from gradlab.experiments import gradient_flow  # noqa: E402
from gradlab.trials import supervised_mlp  # noqa: E402


def kind(op: str) -> str:
    """An XLA operation's name without its number; every dot and dot_general is one kind."""
    base = re.sub(r"\.\d+$", "", op)
    return "dot" if base.startswith("dot") else base


def op_times(trace: Path) -> tuple[collections.Counter, collections.Counter]:
    """Seconds and calls per XLA operation in a perfetto trace; runtime and Python events left out."""
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "$" in name or "::" in name or name.startswith(("end: ", "Pjit", "Pjrt")):
            continue
        seconds[kind(name)] += e.get("dur", 0) / 1e6
        calls[kind(name)] += 1
    return seconds, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="operation kinds listed")
    args = parser.parse_args()
    runtime.setup(cache=False)
    w = dict(sweep_throughput.workload("cpu"), steps=args.steps)
    spec = config.load("gradient_flow", gradient_flow.Config, sweep_throughput.overrides(w))
    (group,) = config.plan(spec).groups
    compiled = engine.compile_group(supervised_mlp(group.config), group.hp, args.steps, args.steps, jax.local_devices())
    hp = compiled.hp(0)

    def run_once() -> float:
        carry = compiled.init(hp)  # the chunk donates its carry: a fresh one per run
        jax.block_until_ready(carry)
        start = time.perf_counter()
        jax.block_until_ready(compiled.chunk(hp, carry, np.int32(0)))
        return time.perf_counter() - start

    run_once()  # warm-up
    runs = [run_once() for _ in range(args.repeats)]
    flop = sweep_throughput.flops(w)
    print(
        f"jax {jax.__version__}, {jax.local_devices()[0].device_kind}: W at {args.steps} steps, "
        f"best {min(runs):.2f} s, median {np.median(runs):.2f} s ({flop / min(runs) / 1e9:.0f} GFLOP/s best)"
    )
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            traced = run_once()
        (trace,) = Path(logdir).rglob("perfetto_trace.json.gz")
        seconds, calls = op_times(trace)
    total = sum(seconds.values())
    print(f"traced run {traced:.2f} s; its XLA operations sum to {total:.2f} s")
    print(f"{'s':>8} {'share':>6} {'calls':>7}  operation")
    for name, s in seconds.most_common(args.top):
        print(f"{s:8.3f} {100 * s / total:5.1f}% {calls[name]:7d}  {name}")
    dots = seconds["dot"]
    if dots:
        print(f"dots: {flop / dots / 1e9:.0f} GFLOP/s while they run (W's 3 x forward matmul flops / dot seconds)")


if __name__ == "__main__":
    main()
