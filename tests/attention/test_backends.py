"""Backends: every family on every backend it claims computes the XLA backend's function
(outputs and gradients); a backend a family lacks fails when the module is built, naming
the ones it has; the Pallas kernel lowers to Triton for a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import effx.attention as ea
from effx.attention import flash, kernel
from effx.attention.core import Band
from effx.models.config import ModelConfig
from support import SMALL, cases, padding_mask, qkv

PALLAS = [(n, c) for n, c in cases() if "pallas" in ea.backends(n)]


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


@pytest.mark.parametrize("name,causal", PALLAS)
def test_pallas_equals_xla(name, causal):
  """float32, padded row, [2, 37, 3, 8] (ragged: lengths are padded to whole blocks):
  outputs and gradients within 1e-5 of the XLA kernel's, relative to their largest
  value. The Pallas kernel runs in interpret mode here."""
  q, k, v = qkv()
  mask = padding_mask()
  want, got = _out_and_grads(name, causal, ("xla", "pallas"), q, k, v, mask)
  assert _relative(got[0], want[0]) <= 1e-5, name
  for g, w, which in zip(got[1], want[1], "qkv"):
    assert _relative(g, w) <= 1e-5, f"{name}: d{which}"


def test_pallas_bfloat16_close_to_xla():
  """bfloat16 inputs: the Pallas kernel multiplies bfloat16 probabilities into bfloat16
  values (the XLA kernel in float32), so the two agree to bfloat16's precision: 2e-2 of
  the largest value, outputs and gradients."""
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(length=64, dim=16))
  mask = padding_mask(length=64)
  want, got = _out_and_grads("local", True, ("xla", "pallas"), q, k, v, mask)
  assert _relative(got[0], want[0]) <= 2e-2
  for g, w in zip(got[1], want[1]):
    assert _relative(g, w) <= 2e-2


def test_a_backend_a_family_lacks_fails_when_built():
  assert ea.backends("dense") == ("xla", "cudnn", "pallas")
  assert ea.backends("local") == ("xla", "pallas")
  assert ea.backends("performer") == ("xla",)
  assert "'pallas'" in ea.options("bigbird").notes["implementation"]
  with pytest.raises(ValueError, match=r"'performer' has no implementation='pallas'; it "
                                       r"runs on: 'auto', 'xla'$"):
    ea.make("performer", implementation="pallas")
  with pytest.raises(ValueError, match=r"'local' has no implementation='cudnn'; it runs "
                                       r"on: 'auto', 'xla', 'pallas'"):
    ea.make("local", implementation="cudnn")
  with pytest.raises(ValueError, match="runs mode='factorized_random' only"):
    ea.make("synthesizer", implementation="pallas")
  with pytest.raises(ValueError, match="'linformer' has no implementation='pallas'"):
    ea.SelfAttention(num_heads=2, qkv_features=8, attention="linformer",
                     attention_kwargs={"max_len": 16}, implementation="pallas")
  with pytest.raises(ValueError, match=r"model.implementation='splash': attention 'local' "
                                       r"runs on 'auto', 'xla', 'pallas'"):
    ModelConfig(attention="local", implementation="splash").block  # noqa: B018
  with pytest.raises(ValueError, match="implementation='splash' is not available"):
    with kernel.backend("splash"):
      pass


def test_auto_picks_pallas_on_a_gpu_when_the_blocks_make_triton_tiles():
  small, large = kernel.Layout.band(64, 8, 8, 8), kernel.Layout.band(512, 64, 64, 64)
  assert kernel.resolve("auto", large, "gpu") == "pallas"
  assert kernel.resolve("auto", small, "gpu") == "xla"
  assert kernel.resolve("auto", large, "cpu") == "xla"
  assert kernel.resolve("auto", large, "tpu") == "xla"
  assert kernel.resolve("pallas", small, "cpu") == "pallas"  # interpret mode
  with pytest.raises(ValueError, match=r"block_q=8: Triton tiles must be powers of two of "
                                       r"at least 16\); use implementation='xla'"):
    kernel.resolve("pallas", small, "gpu")


def test_the_choice_is_recorded_while_tracing():
  q, k, v = qkv()
  for implementation, want in (("auto", {"xla"}), ("pallas", {"pallas"})):
    module = ea.make("longformer", implementation=implementation, **SMALL["longformer"])
    with kernel.recording() as seen:
      jax.eval_shape(lambda q: module.apply({}, q, k, v), q)
    assert seen == want
  with kernel.recording() as seen:
    jax.eval_shape(lambda q: ea.make("dense").apply({}, q, k, v), q)
  assert seen == {"xla"}


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
