"""effx's families as "layer" peers of an external side-by-side benchmark harness.

The harness calls ``register(registry, api)`` and gives ``api.add_peer`` and
``api.compile_bench``. Each peer is ``effx.attention.SelfAttention`` (12 heads x 64, hidden
768, projections included) with settings matched to the published implementation it sits
beside:

* ``local`` window 384: a band of +-384 sees 769 keys; local-attention's 3 windows of 256
  see 768.
* ``lsh`` 8 hashes, bucket 64: reformer-pytorch's LSH layer with the same.
* ``linformer`` k 256, ``performer`` 256 features: lucidrains' linformer and
  performer-pytorch with the same.
* ``dense`` and ``blockwise`` (exact) sit beside a plain JAX layer around
  ``jax.nn.dot_product_attention`` and torch's ``scaled_dot_product_attention`` layer.
"""

SETTINGS = {
    "dense": {},
    "blockwise": {},
    "local": {"window": 384},
    "longformer": {"window": 384},
    "bigbird": {"block_size": 64, "num_random_blocks": 3},
    "lsh": {"n_hashes": 8, "bucket_size": 64},
    "linformer": {"k": 256},
    "performer": {"num_features": 256},
    "linear": {},
    "nystrom": {"num_landmarks": 128},
}


def register(registry, api):
  del registry
  import jax  # noqa: PLC0415 (imported in the harness's worker process)

  import effx.attention as ea  # noqa: PLC0415

  def builder(name, options):
    def build(length):
      layer = ea.SelfAttention(num_heads=12, qkv_features=768, attention=name,
                               attention_kwargs=options or None)
      x = jax.random.normal(jax.random.PRNGKey(1), (1, length, 768))
      key = jax.random.PRNGKey(0)
      rngs = {"params": key, "dropout": key, "attention": key}
      variables = layer.init(rngs, x)

      def apply(v, x_):
        return layer.apply(v, x_, deterministic=True, rngs=rngs)

      def loss(v, x_):
        return apply(v, x_).mean()

      return api.compile_bench(apply, loss, (variables, x), (variables, x), None,
                               {"effx": name, **options})
    return build

  for name, options in SETTINGS.items():
    api.add_peer(f"effx-{name}", f"effx {name} {options}", "layer", builder(name, options))
