"""Per-token decoding time and decode-state size of a small causal LM against context length.

  python -m effx.bench.decode --out=/tmp/decode_bench --lengths=256,1024,4096,16384 \\
      --families=dense,blockwise,local,dilated,linear,performer,cosformer --steps=32 \\
      --max-cache-length=4096

The model (``SIZE``): 2 layers, width 256, 4 heads of 64, MLP 1024, rotary positions,
vocab 257, batch 1, float32, random weights; each family at its effx defaults, except
cosformer's ``max_len`` (the largest capacity measured, which its decoding needs).

For each family and context length L, in this process:

1. The decode state after L tokens, built by decoding L random tokens one at a time
   (a jitted ``lax.scan`` of the step, as ``effx.models.generate`` does; ``prefill_s``, its
   run without compilation).
2. Greedy generation of ``--steps`` further tokens, a jitted scan of decode steps:
   compiled and run once to warm up, then the median (min, max) of ``--repeat`` runs,
   reported in ms per token (``compile_s``: that scan's compilation). Every run starts
   from the same state (a fresh copy, made outside the timing, is donated so the scan
   updates it in place).
3. ``state_bytes``: the decode state's size (``init_cache(1, L + steps)``'s leaves after
   L tokens); ``step_temp_bytes``: XLA's compiled temporaries of one decode step
   (``memory_analysis()``), for information.

With ``--max-cache-length=N``, families whose state grows with the context (dense,
blockwise) stop at L <= N: building their state by decoding costs O(L^2) (on one CPU
core, about 14 minutes for L=16384). With ``--recompute-max=N`` (default 1024), dense is
also measured for L <= N without a state (``method=recompute``): each new token runs the
whole model over the token buffer (``L + steps`` slots, the rest padding), as
``effx.models.generate`` does with ``recompute=True``; its ``state_bytes`` is that token buffer.

Writes ``decode.csv``, ``decode.png`` (ms per token and state MiB against L, log-log) and
``README.md`` (command, machine, table, a reading) to ``--out``; prints the table.
"""

from __future__ import annotations

import functools
import os
import shlex
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import flags

from effx import cli, models
from effx.attention import registry
from effx.bench import harness
from effx.models import generate

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FLAGS = flags.FLAGS
FAMILIES = ("dense", "blockwise", "local", "dilated", "linear", "performer", "cosformer")
# The measured model; tests shrink it through ``run(size=...)``.
SIZE = {"num_layers": 2, "emb_dim": 256, "num_heads": 4, "qkv_dim": 256, "mlp_dim": 1024,
        "vocab_size": 257}
COLUMNS = ("family", "method", "length", "capacity", "steps", "ms_per_token", "ms_min",
           "ms_max", "state_bytes", "step_temp_bytes", "prefill_s", "compile_s")


def build_model(family: str, max_capacity: int, size: dict[str, int] | None = None):
  """The benchmark's ``CausalLM`` and its (unboxed) random parameters."""
  kwargs = {"max_len": max_capacity} if family == "cosformer" else {}
  model = models.build(dict(kind="causal_lm", positional="rotary", dropout_rate=0.0,
                            dtype="float32", max_len=max_capacity, attention=family,
                            attention_kwargs=kwargs, **(size or SIZE)))
  tokens = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
  return model, params


def _cache_step(model, params, state, tokens):
  """One decode step: ``tokens [batch]`` -> ``(logits [batch, vocab], state)``."""
  logits, aux = model.apply({"params": params}, tokens[:, None], cache=state)
  return logits[:, 0], aux["cache"]


def _prefill(model, params, state, tokens):
  """The state after feeding ``tokens [batch, L]`` one at a time."""
  def body(state, token):
    return _cache_step(model, params, state, token)[1], None
  return jax.lax.scan(body, state, tokens.T)[0]


def _generate(model, params, state, *, token, steps):
  """``steps`` greedy tokens after ``token [batch]``; returns the state after them."""
  def body(carry, _):
    state, token = carry
    logits, state = _cache_step(model, params, state, token)
    return (state, generate.sample(logits, None, temperature=0.0)), None
  return jax.lax.scan(body, (state, token), None, length=steps)[0][0]


def _recompute_generate(model, params, buffer, *, length, steps):
  """``steps`` greedy tokens after the ``length`` tokens in ``buffer [batch, capacity]``,
  each from a forward over the whole buffer (nothing kept between tokens)."""
  def body(buffer, t):
    logits, _ = model.apply({"params": params}, buffer)
    nxt = generate.sample(jnp.take(logits, t - 1, axis=1), None, temperature=0.0)
    return buffer.at[:, t].set(nxt), None
  return jax.lax.scan(body, buffer, length + jnp.arange(steps))[0]


def _time_runs(fn, make_input, repeat: int) -> list[float]:
  """Seconds of ``fn(make_input())`` per run after one warm-up; inputs are made (and
  blocked on) outside the timing, since ``fn`` may donate them."""
  jax.block_until_ready(fn(make_input()))
  times = []
  for _ in range(repeat):
    x = jax.block_until_ready(make_input())
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return times


def _tree_bytes(tree) -> int:
  """Bytes of a tree of arrays or ``ShapeDtypeStruct``s."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(model, params, length: int, *, steps: int, repeat: int,
            method: str = "cache") -> dict[str, Any]:
  """One row: ``model`` (from ``build_model``) decoding ``steps`` tokens after a context
  of ``length``, with its state (``method="cache"``) or without (``"recompute"``)."""
  capacity = length + steps
  rng = np.random.default_rng(length)
  prompt = jnp.asarray(rng.integers(1, model.config.vocab_size, (1, length)), jnp.int32)
  if method == "cache":
    state = model.init_cache(1, capacity)
    prefill = jax.jit(functools.partial(_prefill, model), donate_argnums=1)
    prefill = prefill.lower(params, state, prompt).compile()
    start = time.perf_counter()
    state = jax.block_until_ready(prefill(params, state, prompt))
    prefill_s = time.perf_counter() - start
    token = prompt[:, -1]
    step = jax.jit(functools.partial(_cache_step, model)).lower(params, state, token)
    gen = functools.partial(_generate, model, token=token, steps=steps)
  elif method == "recompute":
    state = jnp.zeros((1, capacity), jnp.int32).at[:, :length].set(prompt)  # the tokens
    prefill_s = 0.0
    step = jax.jit(lambda p, b: model.apply({"params": p}, b)[0]).lower(params, state)
    gen = functools.partial(_recompute_generate, model, length=length, steps=steps)
  else:
    raise ValueError(f"method={method!r} must be 'cache' or 'recompute'")
  step_temp = int(step.compile().memory_analysis().temp_size_in_bytes)
  start = time.perf_counter()
  gen = jax.jit(gen, donate_argnums=1).lower(params, state).compile()
  compile_s = time.perf_counter() - start
  times = _time_runs(functools.partial(gen, params),
                     functools.partial(jax.tree.map, jnp.copy, state), repeat)
  ms = [1e3 * t / steps for t in times]
  return {"family": model.config.attention, "method": method, "length": length,
          "capacity": capacity, "steps": steps, "ms_per_token": statistics.median(ms),
          "ms_min": min(ms), "ms_max": max(ms), "state_bytes": _tree_bytes(state),
          "step_temp_bytes": step_temp, "prefill_s": prefill_s, "compile_s": compile_s}


def check_families(text: str) -> list[str]:
  families = [f for f in text.split(",") if f]
  bad = [f for f in families if f not in registry.names() or not registry.get(f).decodable]
  if bad or not families:
    decodable = [n for n in registry.names() if registry.get(n).decodable]
    raise ValueError(f"--families: {', '.join(map(repr, bad)) or 'none given'}; families "
                     f"that decode token by token: {', '.join(decodable)}")
  return families


def past_limit(model, length: int, limit: int | None, steps: int) -> bool:
  """Whether ``length`` exceeds ``limit`` for a state that is still growing there: a key
  cache, not a ring buffer that stopped at its window nor running sums."""
  if limit is None or length <= limit:
    return False
  def state_bytes(n):
    return _tree_bytes(jax.eval_shape(lambda: model.init_cache(1, n + steps)))
  return state_bytes(length) > state_bytes(limit)


def run(families: Sequence[str], lengths: Sequence[int], *, steps: int = 32, repeat: int = 3,
        recompute_max: int = 1024, max_cache_length: int | None = None,
        size: dict[str, int] | None = None, out: str | None = None,
        machine: str = "2-core CPU", command: str | None = None,
        progress: bool = True) -> list[dict[str, Any]]:
  """Measures every (family, length) (and dense recompute up to ``recompute_max``);
  families whose state grows with the context stop at ``max_cache_length`` (None: no
  limit), since building their state costs O(L^2). Writes ``decode.csv``, ``decode.png``
  and ``README.md`` to ``out`` if given."""
  if steps < 1 or repeat < 1:
    raise ValueError(f"--steps={steps} and --repeat={repeat} must be >= 1")
  max_capacity = max(lengths) + steps
  recompute = [n for n in lengths if n <= recompute_max]
  # One model (and compiled init) per family.
  built = {f: build_model(f, max_capacity, size)
           for f in dict.fromkeys([*families, *(["dense"] if recompute else [])])}
  configs, skipped = [], []
  for family in families:
    for n in lengths:
      too_long = past_limit(built[family][0], n, max_cache_length, steps)
      (skipped if too_long else configs).append((family, n, "cache"))
  configs += [("dense", n, "recompute") for n in recompute]
  rows = []
  for i, (family, length, method) in enumerate(configs):
    row = measure(*built[family], length, steps=steps, repeat=repeat, method=method)
    rows.append(row)
    if progress:
      print(f"[{i + 1}/{len(configs)}] {_label(row)} L={length}: "
            f"{row['ms_per_token']:.3f} ms/token, state {row['state_bytes'] / 2**20:.3f} MiB, "
            f"prefill {row['prefill_s']:.1f} s, compile {row['compile_s']:.1f} s", flush=True)
  if out:
    note = "" if not skipped else (
        f"Not measured: {', '.join(f'{f} at L={n}' for f, n, _ in skipped)} (key caches "
        f"stop at --max-cache-length={max_cache_length}: building the state of L tokens by "
        "decoding them costs O(L^2)).")
    write_outputs(out, rows, machine=machine, command=command or harness.command_line(),
                  size=size or SIZE, note=note)
  return rows


def _label(row) -> str:
  return row["family"] if row["method"] == "cache" else f"{row['family']} ({row['method']})"


def markdown_table(rows) -> str:
  """One row per family (and method), one column per length: ``ms/token · state MiB``."""
  lengths = sorted({r["length"] for r in rows})
  lines = ["| family | " + " | ".join(f"L={n}" for n in lengths) + " |",
           "| --- |" + " --- |" * len(lengths)]
  for label in dict.fromkeys(_label(r) for r in rows):
    cells = []
    for n in lengths:
      r = next((r for r in rows if _label(r) == label and r["length"] == n), None)
      cells.append("-" if r is None else
                   f"{r['ms_per_token']:.3g} ms · {r['state_bytes'] / 2**20:.3g} MiB")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def reading(rows) -> str:
  """Two or three sentences on how time and state scale, from the measured ratios."""
  cached = [r for r in rows if r["method"] == "cache"]
  at = {(r["family"], r["length"]): r for r in cached}
  measured = {}
  for r in cached:
    measured.setdefault(r["family"], []).append(r["length"])
  growing = [f for f, ns in measured.items()
             if at[f, max(ns)]["state_bytes"] > 1.5 * at[f, min(ns)]["state_bytes"]]
  flat = [f for f in measured if f not in growing]
  text = []
  grow = ("the key caches of {} grow {} and their time per token {} (each step reads "
          "every cached key)")
  keep = "{} keep a fixed-size state ({}) and their time per token changes {}"
  for fams, says in ((growing, grow), (flat, keep)):
    lo = max((min(measured[f]) for f in fams), default=0)
    hi = min((max(measured[f]) for f in fams), default=0)
    if hi <= lo:
      continue
    ratios = [[at[f, hi][k] / at[f, lo][k] for f in fams] for k in ("state_bytes",
                                                                    "ms_per_token")]
    spans = []
    for values in ratios:
      low, high = f"{min(values):.2g}x", f"{max(values):.2g}x"
      spans.append(low if low == high else f"{low}-{high}")
    text.append(f"From L={lo} to L={hi}, " + says.format(", ".join(fams), *spans) + ".")
  recompute = [r for r in rows if r["method"] == "recompute"]
  if recompute:
    r = max(recompute, key=lambda r: r["length"])
    dense = next((c for c in cached if c["family"] == "dense" and c["length"] == r["length"]),
                 None)
    if dense:
      text.append(f"Without a state (dense, recompute), a token at L={r['length']} costs "
                  f"{r['ms_per_token'] / dense['ms_per_token']:.0f}x a cached dense step.")
  return " ".join(text)


def plot(rows, path: str, title: str) -> None:
  fig, axs = plt.subplots(1, 2, figsize=(12, 5))
  cmap = plt.get_cmap("tab10")
  for i, label in enumerate(dict.fromkeys(_label(r) for r in rows)):
    pts = sorted((r["length"], r["ms_per_token"], r["state_bytes"] / 2**20) for r in rows
                 if _label(r) == label)
    xs, ms, mib = zip(*pts)
    style = {"marker": "o", "ms": 3, "color": "black" if label == "dense" else cmap(i % 10),
             "lw": 2.2 if label == "dense" else 1.2, "ls": "--" if "(" in label else "-",
             "label": label}
    axs[0].plot(xs, ms, **style)
    axs[1].plot(xs, mib, **style)
  for ax, ylabel in zip(axs, ("ms per token", "decode state (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.2)
  axs[0].legend(fontsize=8, loc="upper left")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(out: str, rows, *, machine: str, command: str, size: dict[str, int],
                  note: str = "") -> None:
  os.makedirs(out, exist_ok=True)
  harness.write_csv(os.path.join(out, "decode.csv"), rows, COLUMNS)
  model = (f"{size['num_layers']} layers, width {size['emb_dim']}, {size['num_heads']} heads, "
           f"MLP {size['mlp_dim']}, vocab {size['vocab_size']}, rotary, batch 1, float32")
  steps = rows[0]["steps"] if rows else 0
  plot(rows, os.path.join(out, "decode.png"),
       f"greedy decoding, {steps} tokens after a context of L ({model})")
  info = harness.device_info()
  lines = ["# Decoding benchmark: time per token and decode state against context", "",
           "```", command, "```", "",
           f"Machine: {machine}; {info['device']}; jax {info['jax']}; Python {info['python']}.",
           (f"Model: {model}; family options at effx defaults (cosformer: max_len = largest "
            f"capacity). Each cell: median ms per token over {steps} greedy tokens after a "
            "context of L, and the decode state's MiB."), "",
           "![decode](decode.png)", "", markdown_table(rows), "", reading(rows)]
  if note:
    lines += ["", note]
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def define_flags() -> None:
  # Not required=True: absl would then require --out of every later command run in the
  # same process (tests run several through cli.run); main checks it.
  flags.DEFINE_string("out", None, "folder for decode.csv, decode.png, README.md (required)")
  flags.DEFINE_string("lengths", "256,1024,4096,16384", "comma-separated context lengths")
  flags.DEFINE_string("families", ",".join(FAMILIES), "comma-separated names")
  flags.DEFINE_integer("steps", 32, "tokens generated per timed run")
  flags.DEFINE_integer("repeat", 3, "timed runs (median reported)")
  flags.DEFINE_integer("recompute-max", 1024,
                       "also time dense recompute for lengths up to this (0: never)")
  flags.DEFINE_integer("max-cache-length", None,
                       "longest context for families whose state grows with it (dense, "
                       "blockwise); default: every length")
  flags.DEFINE_string("machine", "2-core CPU", "recorded in README.md")


def main() -> None:
  if not FLAGS.out:
    raise ValueError("--out is required: the folder for decode.csv, decode.png, README.md")
  command = "python -m effx.bench.decode " + " ".join(
      shlex.quote(f"--{name}={FLAGS[name].value}") for name in _GIVEN if FLAGS[name].present)
  rows = run(check_families(FLAGS.families), harness.parse_lengths(FLAGS.lengths),
             steps=FLAGS.steps, repeat=FLAGS.repeat, recompute_max=FLAGS["recompute-max"].value,
             max_cache_length=FLAGS["max-cache-length"].value, out=FLAGS.out,
             machine=FLAGS.machine, command=command)
  print(markdown_table(rows))


_GIVEN = ("out", "lengths", "families", "steps", "repeat", "recompute-max",
          "max-cache-length", "machine")


if __name__ == "__main__":
  cli.run(define_flags, main)
