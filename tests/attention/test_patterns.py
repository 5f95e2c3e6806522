"""Allow-patterns and their pictures."""

import numpy as np
import pytest

import effx.attention as ea


def test_pattern_families():
  assert set(ea.pattern_names()) == {"dense", "blockwise", "local", "dilated", "sparse",
                                      "longformer", "bigbird", "lsh", "routing"}


def test_textbook_shapes():
  band = ea.pattern("local", 16, window=2)[0]
  assert band[8].sum() == 5 and band[0].sum() == 3
  dil = ea.pattern("dilated", 16, window=2, dilation=3)[0]
  assert np.flatnonzero(dil[8]).tolist() == [2, 5, 8, 11, 14]
  glob = ea.pattern("longformer", 16, window=1, global_tokens=(0,))[0]
  assert glob[0].all() and glob[:, 0].all() and glob[8].sum() == 4
  causal = ea.pattern("dense", 8, causal=True)[0]
  np.testing.assert_array_equal(causal, np.tri(8, dtype=bool))
  bird = ea.pattern("bigbird", 64, num_heads=2, block_size=8, num_random_blocks=1)
  assert bird.shape == (2, 64, 64) and not np.array_equal(bird[0], bird[1])


def test_dilated_default_reaches_every_position_of_the_window():
  """Default dilation: half the heads undilated, so position 0 (a [CLS] token) meets
  every position of its window; dilation 2 on every head never meets an odd one."""
  default = ea.pattern("dilated", 32, num_heads=4, window=6)
  assert default[:, 0, :7].any(axis=0).all()
  assert [np.flatnonzero(h[0]).tolist() for h in default[[0, 3]]] == [
      list(range(7)), [0, 2, 4, 6, 8, 10, 12]]
  assert not ea.pattern("dilated", 32, num_heads=4, window=6, dilation=2)[:, 0, 1::2].any()
  assert ea.pattern("dilated", 8, num_heads=1, window=2)[0, 0].tolist() == [1, 1, 1] + [0] * 5


def test_content_pattern_is_drawn_for_random_inputs():
  p = ea.pattern("lsh", 32, num_heads=2, bucket_size=8)
  assert p.shape == (2, 32, 32) and 0 < p.mean() < 1


@pytest.mark.parametrize("name", ["local", "bigbird", "routing"])
def test_plot_pattern_writes_a_png(tmp_path, name):
  path = ea.plot_pattern(name, 64, tmp_path / f"{name}.png", num_heads=2)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_families_without_a_pattern_say_so():
  with pytest.raises(ValueError, match="performer.*no sparsity pattern.*local"):
    ea.pattern("performer", 16)
  with pytest.raises(ValueError, match="length=0"):
    ea.pattern("local", 0)
