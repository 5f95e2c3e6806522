"""The decoding benchmark runs end to end on a tiny model and reports sane figures."""

import csv

import pytest

from effx import cli, models
from effx.bench import decode

TINY = {"num_layers": 1, "emb_dim": 16, "num_heads": 2, "qkv_dim": 16, "mlp_dim": 32,
        "vocab_size": 19}


@pytest.mark.slow  # the whole benchmark: 6 measured configurations, plots and README
def test_decode_benchmark_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setattr(decode, "SIZE", TINY)
  argv = [f"--out={tmp_path}", "--lengths=16,32,64", "--families=dense,linear", "--steps=4",
          "--repeat=1", "--recompute-max=16", "--max-cache-length=32", "--machine=test box"]
  assert cli.run(decode.define_flags, decode.main, argv) == 0
  with open(tmp_path / "decode.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == decode.COLUMNS
  assert [(r["family"], r["method"], int(r["length"])) for r in table] == [
      ("dense", "cache", 16), ("dense", "cache", 32), ("linear", "cache", 16),
      ("linear", "cache", 32), ("linear", "cache", 64), ("dense", "recompute", 16)]
  for r in table:
    assert int(r["capacity"]) == int(r["length"]) + 4
    assert 0 < float(r["ms_min"]) <= float(r["ms_per_token"]) <= float(r["ms_max"])
    assert int(r["step_temp_bytes"]) > 0
  state = {(r["family"], r["method"], int(r["length"])): int(r["state_bytes"]) for r in table}
  assert state[("linear", "cache", 16)] == state[("linear", "cache", 64)]
  # A key cache holds every token: per layer, a float32 key and value and an int32 position.
  per_token = TINY["num_layers"] * (2 * TINY["qkv_dim"] * 4 + 4)
  assert state[("dense", "cache", 32)] - state[("dense", "cache", 16)] == 16 * per_token
  assert state[("dense", "recompute", 16)] == 4 * (16 + 4)  # just the int32 tokens
  assert (tmp_path / "decode.png").stat().st_size > 0
  readme = (tmp_path / "README.md").read_text()
  assert "python -m effx.bench.decode --out=" in readme and "test box" in readme
  assert "| dense (recompute) |" in readme and "From L=16 to L=64" in readme
  assert "Not measured: dense at L=64" in readme  # past --max-cache-length


def test_only_growing_states_stop_at_the_cache_limit():
  def lm(attention, **options):
    return models.build({"kind": "causal_lm", "positional": "rotary", "attention": attention,
                         "attention_kwargs": options, **TINY})
  assert decode.past_limit(lm("dense"), 64, 32, steps=4)
  assert not decode.past_limit(lm("dense"), 32, 32, steps=4)
  assert not decode.past_limit(lm("dense"), 64, None, steps=4)
  assert not decode.past_limit(lm("local", window=8), 64, 32, steps=4)  # a full ring buffer
  assert decode.past_limit(lm("local", window=64), 64, 32, steps=4)     # still filling
  assert not decode.past_limit(lm("linear"), 64, 32, steps=4)


def test_bad_families():
  with pytest.raises(ValueError, match="'lsh'.*decode token by token: .*dense"):
    decode.check_families("dense,lsh")
