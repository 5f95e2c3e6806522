"""Backends: every family on every backend it claims computes the XLA backend's function
(outputs and gradients; Pallas and splash in interpret mode); a backend a family lacks
fails when the module is built, naming the ones it has; a call splash cannot express
fails with the reason, or runs on xla under "auto"; the Pallas kernel lowers to Triton
for a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import effx.attention as ea
from effx.attention import flash, kernel, splash
from effx.attention.core import Band
from effx.models.config import ModelConfig
from support import SMALL, cases, padding_mask, qkv

# Each family on each kernel backend once; both causal settings for dense and local (the
# fast tier's), one for the others (causal where they have it): the suite's time budget.
KERNELS = [(n, c) for n, c in cases() if {"pallas", "splash"} & set(ea.backends(n))
           and (n in ("dense", "local") or c == ea.supports_causal(n))]


def _options(name):
  return {**SMALL.get(name, {}), **({"mode": "factorized_random"}
                                    if name == "synthesizer" else {})}


def _out_and_grads(name, causal, implementations, q, k, v, mask):
  """For each implementation, the family's output and the q, k, v gradients of
  ``sum(out * cos(out))``, all in one compiled program (the variables drawn once: no
  backend changes them)."""
  modules = [ea.make(name, causal=causal, implementation=i, **_options(name))
             for i in implementations]
  variables = jax.jit(modules[0].init)(jax.random.PRNGKey(0), q, k, v, mask=mask)

  def loss(module, q, k, v):
    out = module.apply(variables, q, k, v, mask=mask).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(out)), out

  @jax.jit
  def each(q, k, v):
    return [jax.value_and_grad(functools.partial(loss, m), (0, 1, 2), has_aux=True)(q, k, v)
            for m in modules]

  return [(out, grads) for (_, out), grads in each(q, k, v)]


def _relative(got, want):
  """Largest difference over the largest value (the difference alone when ``want`` is
  zero: LSH's keys are its queries, so its dk is)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1.0 if not want.any() else 0.0)


@pytest.mark.parametrize("name,causal", KERNELS)
def test_kernel_backends_equal_xla(name, causal):
  """Each of pallas and splash the family has, float32, padded row, [2, 37, 3, 8]
  (ragged: lengths are padded to whole blocks, splash's to 128): outputs and gradients
  within 1e-5 of the XLA kernel's, relative to their largest value. Pallas and splash
  run in interpret mode here."""
  q, k, v = qkv()
  mask = padding_mask()
  backends = [b for b in ("pallas", "splash") if b in ea.backends(name)]
  want, *got = _out_and_grads(name, causal, ("xla", *backends), q, k, v, mask)
  for backend, (out, grads) in zip(backends, got):
    assert _relative(out, want[0]) <= 1e-5, f"{name} on {backend}"
    for g, w, which in zip(grads, want[1], "qkv"):
      assert _relative(g, w) <= 1e-5, f"{name} on {backend}: d{which}"


def test_bfloat16_close_to_xla():
  """bfloat16 inputs: the Pallas kernel multiplies bfloat16 probabilities into bfloat16
  values, splash rounds its output and the backward's probabilities to bfloat16 (the XLA
  kernel keeps float32), so they agree to bfloat16's precision: 2e-2 of the largest
  value, outputs and gradients."""
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(length=64, dim=16))
  mask = padding_mask(length=64)
  want, *got = _out_and_grads("local", True, ("xla", "pallas", "splash"), q, k, v, mask)
  for out, grads in got:
    assert _relative(out, want[0]) <= 2e-2
    for g, w in zip(grads, want[1]):
      assert _relative(g, w) <= 2e-2


def test_a_backend_a_family_lacks_fails_when_built():
  assert ea.backends("dense") == ("xla", "cudnn", "pallas", "splash")
  assert ea.backends("local") == ("xla", "pallas", "splash", "cudnn")
  assert ea.backends("bigbird") == ea.backends("lsh") == ("xla", "pallas")
  assert ea.backends("performer") == ("xla",)
  assert "'pallas'" in ea.options("bigbird").notes["implementation"]
  with pytest.raises(ValueError, match=r"'performer' has no implementation='pallas'; it "
                                       r"runs on: 'auto', 'xla'$"):
    ea.make("performer", implementation="pallas")
  with pytest.raises(ValueError, match=r"'blockwise' has no implementation='cudnn'; it runs "
                                       r"on: 'auto', 'xla', 'pallas', 'splash'$"):
    ea.make("blockwise", implementation="cudnn")
  with pytest.raises(ValueError, match=r"'bigbird' has no implementation='splash'; it runs "
                                       r"on: 'auto', 'xla', 'pallas'$"):
    ea.make("bigbird", implementation="splash")
  for backend in ("pallas", "splash"):
    with pytest.raises(ValueError, match=f"implementation='{backend}' runs "
                                         f"mode='factorized_random' only"):
      ea.make("synthesizer", implementation=backend)
  with pytest.raises(ValueError, match="'linformer' has no implementation='pallas'"):
    ea.SelfAttention(num_heads=2, qkv_features=8, attention="linformer",
                     attention_kwargs={"max_len": 16}, implementation="pallas")
  with pytest.raises(ValueError, match=r"model.implementation='splash': attention 'lsh' "
                                       r"runs on 'auto', 'xla', 'pallas'"):
    ModelConfig(attention="lsh", implementation="splash").block  # noqa: B018
  with pytest.raises(ValueError, match="implementation='triton' is not available"):
    with kernel.backend("triton"):
      pass


def test_auto_picks_pallas_on_a_gpu_and_splash_on_a_tpu_where_they_can_run():
  small, large = kernel.Layout.band(64, 8, 8, 8), kernel.Layout.band(512, 64, 64, 64)
  pos = np.broadcast_to(np.arange(512), (2, 512))
  plan = splash.plan(large, pos, pos, heads=2, causal=False, rule=Band(64), bias=None)
  assert plan.masks == (("local", 64, 64),) * 2  # splash's lazy LocalMask
  assert kernel.resolve("auto", large, "gpu") == "pallas"
  assert kernel.resolve("auto", small, "gpu") == "xla"
  assert kernel.resolve("auto", large, "cpu", splash=plan) == "xla"
  assert kernel.resolve("auto", large, "tpu", splash=plan) == "splash"
  assert kernel.resolve("auto", large, "tpu", splash="a reason") == "xla"
  assert kernel.resolve("pallas", small, "cpu") == "pallas"  # interpret mode
  with pytest.raises(ValueError, match=r"block_q=8: Triton tiles must be powers of two of "
                                       r"at least 16\); use implementation='xla'"):
    kernel.resolve("pallas", small, "gpu")
  reasons = {
      "drawn per example": (kernel.Layout.from_table(jnp.zeros((1, 1, 8, 1), int),
                                                     jnp.ones((1, 1, 8, 1), bool), 64, 64, 8),
                            pos, pos, None),
      "computed at run time": (large, None, pos, None),
      "differ between examples": (large, pos * np.array([[1], [0]]), pos, None),
      "logit bias": (large, pos, pos, _SameFeature()),
  }
  for reason, (layout, qp, kp, bias) in reasons.items():
    plans = []  # positions None: a traced array
    jax.eval_shape(lambda p: plans.append(splash.plan(  # noqa: B023
        layout, p if qp is None else qp, kp, heads=2, causal=True, rule=None,  # noqa: B023
        bias=bias)), pos)  # noqa: B023
    why = plans[0]
    assert reason in why
    with pytest.raises(ValueError, match=f"implementation='splash' cannot run this call: "
                                         f"it.*{reason}.*; use implementation='xla'"):
      kernel.resolve("splash", layout, "cpu", splash=why)


def _traced_backends(name, implementation="auto", length=37, **options):
  q, k, v = qkv(length=length)
  module = ea.make(name, implementation=implementation, **{**SMALL.get(name, {}), **options})
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), q, k, v)
  with kernel.recording() as seen:
    jax.eval_shape(lambda q: module.apply(variables, q, k, v), q)
  return seen


def test_the_choice_is_recorded_while_tracing():
  assert _traced_backends("longformer") == {"xla"}
  assert _traced_backends("longformer", "pallas") == {"pallas"}
  assert _traced_backends("longformer", "splash") == {"splash"}
  assert _traced_backends("dense") == {"xla"}
  assert _traced_backends("dense", "splash") == {"splash"}
  # Traced for a TPU (as a program compiled ahead of time is), "auto" takes splash where
  # the layout allows it and says why not elsewhere; for a GPU, Pallas or cuDNN.
  with kernel.platform("tpu"):
    assert _traced_backends("local", length=120) == {"splash"}
    assert _traced_backends("dense", length=120) == {"splash"}
    assert _traced_backends("bigbird", num_global_blocks=0) == {
        "xla (no splash: its layout is drawn per example (splash masks are one per head))"}
    # Sequences mostly padding to splash's 128-wide tiles stay on xla under "auto".
    assert _traced_backends("local") == {
        "xla (no splash: its sequences of 37 tokens would run padded to 128)"}
  with kernel.platform("gpu"):
    assert _traced_backends("local", length=64) == {"pallas"}  # blocks of 64


def test_causal_local_on_cudnn_asks_for_the_same_window(monkeypatch):
  """cuDNN cannot run here, so ``jax.nn.dot_product_attention`` is given its XLA
  implementation with the very arguments local passes cuDNN (the window, causality,
  the padding): it must compute local's function. Non-causal local refuses cuDNN."""
  calls = []
  original = jax.nn.dot_product_attention

  def on_xla(*args, implementation=None, **kwargs):
    calls.append((implementation, kwargs["local_window_size"], kwargs["is_causal"]))
    return original(*args, implementation="xla", **kwargs)

  q, k, v = qkv()
  mask = padding_mask()
  want = ea.make("local", causal=True, implementation="xla", window=4).apply({}, q, k, v,
                                                                            mask=mask)
  monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
  module = ea.make("local", causal=True, implementation="cudnn", window=4)
  with kernel.recording() as seen:
    got = module.apply({}, q, k, v, mask=mask)
  assert calls == [("cudnn", (4, 0), True)] and seen == {"cudnn"}
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="local: implementation='cudnn' runs causal=True only"):
    ea.make("local", implementation="cudnn")


def test_layout_columns_are_the_rows_transposed():
  """Static and dynamic layouts: the column table lists exactly the query blocks whose
  rows list the key block (the Pallas backward's dk / dv loop reads it)."""
  rng = np.random.default_rng(0)
  n, slots = 6, 3
  table = np.stack([rng.permutation(n)[:slots] for _ in range(2 * n)]).reshape(2, 1, n, slots)
  ok = rng.random(table.shape) > 0.3
  layouts = [kernel.Layout.from_blocks(rng.random((n, n + 1)) < 0.4, 4, 4),
             kernel.Layout.from_table(jnp.asarray(table), jnp.asarray(ok), 4, 4, n)]
  for layout in layouts:
    rows, row_counts = (np.asarray(x) for x in layout.rows())
    cols, col_counts = (np.asarray(x) for x in layout.columns())
    for b, h in np.ndindex(rows.shape[:2]):
      visits = {(i, int(j)) for i in range(layout.num_q)
                for j in rows[b, h, i, :row_counts[b, h, i]]}
      listed = {(int(i), j) for j in range(layout.num_k)
                for i in cols[b, h, j, :col_counts[b, h, j]]}
      assert visits == listed
      assert sum(row_counts[b, h]) == len(visits)  # no pair twice


def test_the_pallas_kernel_lowers_to_triton_for_a_gpu():
  """``jax.export`` for CUDA on this CPU host lowers the forward, dq and dk/dv programs
  through Triton, in bfloat16 with causality, a rule, segments and a logit bias: the
  checks only the GPU lowering makes (operand dtypes, tile shapes) pass."""
  b, h, length, d, block = 1, 2, 256, 64, 64
  layout = kernel.Layout.band(length, block, block, 0)
  tables = tuple(tuple(jnp.broadcast_to(jnp.asarray(x), (b, h) + x.shape[2:]) for x in pair)
                 for pair in (layout.rows(), layout.columns()))
  static = flash.Static(causal=True, rule=Band(block), bias=_SameFeature(),
                        scale=d ** -0.5, block_q=block, block_k=block, interpret=False)
  ints = jax.ShapeDtypeStruct((b, h, length), jnp.int32)
  info = jax.ShapeDtypeStruct((b, h, length, 1), jnp.int32)
  x = jax.ShapeDtypeStruct((b, h, length, d), jnp.bfloat16)

  def grads(q, k, v, pos, valid, segment, features):
    meta = ((pos, segment, features), (pos, valid, segment, features))

    def loss(q, k, v):
      out, lse = flash.attend(q, k, v, meta, tables, static)
      return jnp.sum(out) + jnp.sum(lse)

    return jax.grad(loss, (0, 1, 2))(q, k, v)

  exported = export.export(
      jax.jit(grads), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(x, x, x, ints, ints, ints, info)
  text = exported.mlir_module()
  for name in ("forward", "dq", "dkv"):
    assert f"effx_block_sparse_{name}" in text
  assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3


class _SameFeature:
  """Bias 0.5 where the query's and key's feature match (hashable)."""

  def __hash__(self):
    return 5

  def __eq__(self, other):
    return isinstance(other, _SameFeature)

  def __call__(self, qi, ki):
    return 0.5 * (qi[..., 0] == ki[..., 0]).astype(jnp.float32)
