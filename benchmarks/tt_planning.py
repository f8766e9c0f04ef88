"""tt.py's planning speed: the KV-cached beam search against the same search recomputing the whole block per token.

    python benchmarks/tt_planning.py --label cpu-1core --beam-width 8 --steps 3
    python benchmarks/tt_planning.py --label h200 --beam-width 128 --steps 20

Both planners are built by tt.make_planner from one randomly initialized model of the default size (4 layers, 4 heads,
width 128) with Hopper's dimensions (11 + 3 + 2 tokens per transition), and they return the same plan (tests/
test_sequence.py). One planning step is one env step's search with a full context (5 transitions), horizon --horizon
and --beam-width. Speed does not depend on the weights. Writes benchmarks/results/tt-planning/<label>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import hardware

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import load_script  # noqa: E402

tt = load_script("tt")


def time_planner(plan, inputs: tuple, steps: int) -> tuple[float, float]:
    """(compile + first call seconds, seconds per planning step over `steps` calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(plan(*inputs))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        out = plan(*inputs[:-1], jax.random.PRNGKey(i))
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--beam-width", type=int, default=128)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="planning steps timed per planner")
    p.add_argument("--obs-dim", type=int, default=11)
    p.add_argument("--act-dim", type=int, default=3)
    a = p.parse_args()
    args = tt.Args(beam_width=a.beam_width, horizon=a.horizon, plan_freq=1)
    d, k = a.obs_dim, a.act_dim
    tdim = d + k + 2
    model = tt.make_networks(args, d, k)[0]
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.block_size), jnp.int32))
    rng = np.random.default_rng(0)
    edges = jnp.asarray(np.sort(rng.normal(size=(args.num_bins + 1, tdim)), axis=0), jnp.float32)
    c = args.max_context_transitions
    inputs = (params, edges, jnp.asarray(rng.integers(0, args.num_bins, c * tdim), jnp.int32), jnp.int32(c),
              jnp.asarray(rng.integers(0, args.num_bins, d), jnp.int32), jax.random.PRNGKey(0))
    rows = {}
    for name, cached in (("kv-cache", True), ("recompute", False)):
        first, per_step = time_planner(jax.jit(tt.make_planner(model, args, d, k, cached=cached)), inputs, a.steps)
        rows[name] = {"compile_and_first_s": round(first, 2), "s_per_planning_step": per_step, "planning_steps_per_s": 1 / per_step}
        print(f"{name}: {per_step * 1000:.1f} ms per planning step (compile + first call {first:.1f} s)", flush=True)
    ratio = rows["recompute"]["s_per_planning_step"] / rows["kv-cache"]["s_per_planning_step"]
    out = {"label": a.label, "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
           "beam_width": a.beam_width, "horizon": a.horizon, "num_expand": args.num_expand, "context_transitions": c,
           "transition_tokens": tdim, "model": "4 layers, 4 heads, width 128 (tt.py defaults), random weights", "planners": rows,
           "speedup": ratio, "episode_1000_steps_s": 1000 * rows["kv-cache"]["s_per_planning_step"]}
    folder = ROOT / "benchmarks" / "results" / "tt-planning"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{a.label}.json").write_text(json.dumps(out, indent=2))
    md = [f"# tt.py planning speed: {a.label}", "", f"- Command: `{out['command']}`", f"- Hardware: {out['hardware']}",
          f"- Date: {out['date']}", f"- Search: beam {a.beam_width}, expansion {args.num_expand}, horizon {a.horizon}, "
          f"{c} context transitions of {tdim} tokens; {out['model']}", "",
          "| planner | ms per planning step | planning steps/s | compile + first call (s) |", "|---|---|---|---|"]
    md += [f"| {n} | {r['s_per_planning_step'] * 1000:.1f} | {r['planning_steps_per_s']:.2f} | {r['compile_and_first_s']} |"
           for n, r in rows.items()]
    md += ["", f"KV cache speedup: **{ratio:.1f}x**; one 1000-step episode at plan_freq 1: "
           f"{out['episode_1000_steps_s'] / 60:.1f} min with the cache."]
    (folder / f"{a.label}.md").write_text("\n".join(md) + "\n")
    print(f"speedup {ratio:.1f}x; written {folder / a.label}.md")


if __name__ == "__main__":
    main()
