"""Every family's forward exports with a symbolic batch (``jax.export``, batch ``"b"``,
fixed length): one artifact called at batch 3 equals the module applied directly at batch
3, and at batch 1 equals the first row of that (an example's output does not depend on
the rest of its batch; one direct compile per family instead of two)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import SMALL, padding_mask

import effx.attention as ea

LENGTH, HEADS, DIM = 64, 2, 16
# Two heads: dilated's test option (one dilation per head for 3 heads) becomes one per head
# here, a plain window and a dilated one.
OPTIONS = dict(SMALL, dilated=dict(window=2, dilation=(1, 2)))


def _inputs(batch, seed):
  q, k, v = jax.random.normal(jax.random.PRNGKey(seed), (3, batch, LENGTH, HEADS, DIM))
  return q, k, v, padding_mask(batch, LENGTH)  # row 0 real throughout, later rows padded


# Causal where the family can be (the packed lanes of the kernel's causal layouts), else
# bidirectional: one export per family.
@pytest.mark.parametrize("name", ea.names())
def test_one_artifact_serves_any_batch(name):
  causal = ea.supports_causal(name)
  module = ea.make(name, causal=causal, **OPTIONS.get(name, {}))
  inputs = _inputs(3, 0)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), *inputs[:3], mask=inputs[3])

  def forward(q, k, v, mask):
    return module.apply(variables, q, k, v, mask=mask)

  b = jax.export.symbolic_shape("b")[0]
  qkv = jax.ShapeDtypeStruct((b, LENGTH, HEADS, DIM), jnp.float32)
  exported = jax.export.export(jax.jit(forward))(
      qkv, qkv, qkv, jax.ShapeDtypeStruct((b, LENGTH), jnp.bool_))
  assert str(exported.in_avals[0].shape[0]) == "b"
  want = np.asarray(jax.jit(forward)(*inputs))
  assert np.abs(want).max() > 0.1  # a real output, not zeros on both sides
  for batch in (3, 1):
    got = np.asarray(exported.call(*(x[:batch] for x in inputs)))
    assert got.shape == (batch, LENGTH, HEADS, DIM)
    np.testing.assert_allclose(got, want[:batch], rtol=0, atol=1e-5,
                               err_msg=f"{name}, batch {batch}")
