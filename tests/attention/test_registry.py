"""The family registry, option checking and input checking."""

import jax
import jax.numpy as jnp
import pytest

import effx.attention as ea
from support import qkv

ANCHORS = ("dense", "blockwise", "local", "dilated", "sparse", "longformer", "bigbird", "lsh",
           "routing", "sinkhorn", "linformer", "synthesizer", "nystrom", "performer", "linear")


def test_every_anchor_family_is_registered():
  assert set(ANCHORS) <= set(ea.names())
  assert len(ea.names()) == len(set(ea.names()))


def test_causal_support_matches_the_papers():
  assert {n for n in ea.names() if not ea.supports_causal(n)} == {"bigbird", "linformer",
                                                                   "nystrom"}


def test_unknown_family_lists_the_registered_ones():
  with pytest.raises(ValueError) as err:
    ea.get("flash")
  for name in ANCHORS:
    assert name in str(err.value)


@pytest.mark.parametrize("name,options,match", [
    ("local", dict(window=-1), "window=-1"),
    ("dilated", dict(dilation=0), "dilation=0"),
    ("sparse", dict(pattern="zigzag"), "pattern='zigzag'.*'strided', 'fixed'"),
    ("sparse", dict(stride=4, summary=5), "summary=5 must be <= stride=4"),
    ("longformer", dict(global_tokens=("cls",)), "global_tokens"),
    ("bigbird", dict(num_random_blocks=-1), "num_random_blocks=-1"),
    ("lsh", dict(n_buckets=3), "n_buckets=3 must be an even"),
    ("routing", dict(ema_decay=1.0), "ema_decay"),
    ("sinkhorn", dict(temperature=0.0), "temperature"),
    ("linformer", dict(share="layerwise"), "share='layerwise'"),
    ("synthesizer", dict(mode="fft"), "mode='fft'"),
    ("nystrom", dict(num_landmarks=0), "num_landmarks=0"),
    ("performer", dict(kernel="cosine"), "kernel='cosine'.*'softmax', 'relu'"),
    ("blockwise", dict(q_chunk=0), "q_chunk=0"),
])
def test_invalid_option_names_the_option(name, options, match):
  with pytest.raises(ValueError, match=match):
    ea.make(name, **options)


@pytest.mark.parametrize("name", ["bigbird", "linformer", "nystrom"])
def test_causal_on_a_bidirectional_family(name):
  with pytest.raises(ValueError, match=f"{name}.*does not support causal.*causal families"):
    ea.make(name, causal=True)


def test_unknown_option_lists_valid_ones():
  with pytest.raises(TypeError, match="no option.*'bucket'.*n_hashes, bucket_size"):
    ea.make("lsh", bucket=4)


def test_mismatched_shapes():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="k has shape"):
    ea.local_attention(q, k[:, :5], v)
  with pytest.raises(ValueError, match="v must be"):
    ea.local_attention(q, k, v[:, :, :1])
  with pytest.raises(ValueError, match="mask must be"):
    ea.local_attention(q, k, v, mask=jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match="q must be"):
    ea.dense_attention(q[0], k[0], v[0])


def test_input_longer_than_max_len():
  q, k, v = qkv(length=40)
  module = ea.make("linformer", max_len=32)
  with pytest.raises(ValueError, match="length 40 exceeds option max_len=32"):
    module.init(jax.random.PRNGKey(0), q, k, v)


def test_global_token_outside_the_sequence():
  q, k, v = qkv(length=10)
  with pytest.raises(ValueError, match="global_tokens contains 12"):
    ea.longformer_attention(q, k, v, global_tokens=(0, 12))


def test_per_head_dilation_must_match_heads():
  q, k, v = qkv()
  with pytest.raises(ValueError, match="3 heads"):
    ea.dilated_attention(q, k, v, dilation=(1, 2))


def test_derived_defaults_are_explained():
  """Every option whose default is None (chosen from the input or other options) says
  how in ``options(name)``, and the printed options show it."""
  for name in ea.names():
    opts = ea.options(name)
    derived = {k for k, v in opts.items() if v is None} - {"conv_kernel_size"}  # None = off
    derived.add("implementation")  # "auto": chosen from the device and the input
    assert derived == set(opts.notes), name
    for option in derived:
      assert opts.notes[option] in repr(opts)
  assert "ceil(length / window)" in ea.options("routing").notes["num_clusters"]
