"""Magnitude pruning: the schedule, the masks, the sparsity a run reaches, exact resume."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effx.compress import prune
from effx.training import loop as trainer, validate
from effx.training import workdir as workdir_lib
from conftest import tiny_config


def test_cubic_schedule():
  """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3, by hand."""
  at = lambda t: float(prune.sparsity_at(t, initial=0.1, target=0.9, start=10, end=50))  # noqa: E731
  assert at(5) == 0.0
  assert at(10) == pytest.approx(0.1)
  assert at(30) == pytest.approx(0.9 - 0.8 * 0.5**3)
  assert at(40) == pytest.approx(0.9 - 0.8 * 0.25**3)
  assert at(50) == pytest.approx(0.9) and at(80) == pytest.approx(0.9)


def test_masks_keep_the_largest_weights_per_layer_or_globally():
  rng = np.random.default_rng(0)
  params = {"encoder": {"layers": {"w": {"kernel": jnp.asarray(rng.normal(size=(2, 10, 10)))}}},
            "head": {"kernel": jnp.asarray(10 * rng.normal(size=(5, 4))),
                     "bias": jnp.ones(4)}}
  names = prune.chosen_names(params, r"kernel$", "")
  assert names == ["encoder/layers/w/kernel", "head/kernel"]
  masks = prune.magnitude_masks(params, names, 0.7, "layer")
  stacked = np.asarray(params["encoder"]["layers"]["w"]["kernel"])
  for layer in range(2):  # each layer keeps its own 30 largest magnitudes
    kept = np.asarray(masks["encoder/layers/w/kernel"][layer])
    assert kept.sum() == 30
    assert np.abs(stacked[layer][kept]).min() > np.abs(stacked[layer][~kept]).max()
  assert np.asarray(masks["head/kernel"]).sum() == 6
  both = prune.magnitude_masks(params, names, 0.7, "global")
  everything = np.concatenate([np.abs(stacked).ravel(),
                               np.abs(np.asarray(params["head"]["kernel"])).ravel()])
  cut = np.sort(everything)[int(0.7 * everything.size) - 1]
  assert np.asarray(both["head/kernel"]).sum() == (np.abs(params["head"]["kernel"]) > cut).sum()
  assert np.asarray(both["head/kernel"]).mean() > 0.8  # the large head keeps more globally


def test_the_wrapper_prunes_on_schedule_and_holds_the_masks():
  params = {"layer": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(20, 20)))}}
  tx = prune.magnitude_pruning(optax.sgd(0.01), initial=0.0, target=0.5, start=2, end=6,
                               update_every=2, scope="layer", include="kernel", exclude="")
  state = tx.init(params)
  seen = []
  for step in range(1, 11):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(float(jnp.mean(params["layer"]["kernel"] == 0)))
  expected_at = {2: 0.0, 4: 0.5 - 0.5 * 0.5**3, 6: 0.5}
  for step, value in expected_at.items():
    assert seen[step - 1] == pytest.approx(np.floor(value * 400) / 400)
  assert seen[6:] == [0.5] * 4  # held after end_step
  assert seen[0] == 0.0


def test_movement_scores_accumulate_minus_gradient_times_weight():
  """S = -sum_t g_t * W_t with W the dense weights; masked weights get no loss gradient
  and keep their dense value, and come back with it when their mask does."""
  w0 = jnp.asarray([[2.0, -1.0], [0.5, 3.0]])
  params = {"kernel": w0}
  tx = prune.pruning(optax.sgd(0.1), method="movement", initial=0.0, target=0.5, start=1,
                     end=2, update_every=1, scope="layer", include="kernel", exclude="")
  state = tx.init(params)
  grads = [jnp.asarray([[1.0, 1.0], [-1.0, 0.5]]), jnp.asarray([[0.5, -2.0], [1.0, 1.0]])]
  dense, expected = w0, jnp.zeros_like(w0)
  for g in grads:
    expected = expected - g * dense
    updates, state = tx.update({"kernel": g}, state, params)
    params = optax.apply_updates(params, updates)
    dense = dense - 0.1 * g  # every mask is on during these two steps
  np.testing.assert_allclose(state.scores["kernel"], expected, rtol=1e-6)
  kept = np.asarray(state.masks["kernel"])
  assert kept.sum() == 2  # the two highest scores
  order = np.argsort(-np.asarray(expected).ravel())[:2]
  assert set(np.flatnonzero(kept.ravel())) == set(order)
  np.testing.assert_allclose(np.asarray(params["kernel"])[~kept], 0.0)
  before = np.asarray(state.dense["kernel"])
  updates, state = tx.update({"kernel": jnp.ones((2, 2))}, state, params)
  after = np.asarray(state.dense["kernel"])
  np.testing.assert_allclose(after[~kept], before[~kept])  # no gradient while masked
  np.testing.assert_allclose(after[kept], before[kept] - 0.1)


def _run(workdir, **overrides):
  config = tiny_config("lra_listops", **{
      "num_train_steps": 20, "checkpoint_every_steps": 5, "keep_checkpoints": 10,
      "prune.method": "magnitude", "prune.target_sparsity": 0.8, "prune.update_every": 4,
      **overrides})  # pruning ends at 80% of training: step 16
  return trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow  # a straight and a resumed training run per method
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_a_pruned_run_reaches_its_sparsity_and_resumes_exactly(tmp_path, method):
  straight = _run(tmp_path / "straight", **{"prune.method": method})
  assert straight["sparsity"]["all"] == pytest.approx(0.8, abs=2e-3)
  per_layer = {k: v for k, v in straight["sparsity"].items() if k != "all"}
  assert per_layer and all(v == pytest.approx(0.8, abs=5e-3) for v in per_layer.values())
  assert straight["best_step"] >= 16  # the tested checkpoint has the final sparsity
  # As if killed after the checkpoint of step 10, mid-schedule: resume from it.
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  for step in (15, 20):
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
  resumed = _run(tmp_path / "resumed", **{"prune.method": method})
  assert resumed["sessions"][-1]["start_step"] == 10
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  a = ocp.StandardCheckpointer().restore(tmp_path / "straight" / "checkpoints" / "20" / "state")
  b = ocp.StandardCheckpointer().restore(tmp_path / "resumed" / "checkpoints" / "20" / "state")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # masks included
    np.testing.assert_array_equal(x, y)
  # A new length would move the end of pruning (80% of it): not a harmless change.
  with pytest.raises(workdir_lib.ConfigMismatchError, match="num_train_steps: 20"):
    _run(tmp_path / "resumed", num_train_steps=30, **{"prune.method": method})


@pytest.mark.parametrize("override,match", [
    ({"prune.method": "random"}, "prune.method='random'; one of none, magnitude, movement"),
    ({"prune.scope": "row"}, "prune.scope='row'"),
    ({"prune.target_sparsity": 1.0}, r"prune.target_sparsity=1.0 must be in \[0, 1\)"),
    ({"prune.include": "("}, "prune.include='\\(' is not a regular expression"),
    ({"prune.end_step": 500}, "end_step=500 must satisfy"),
    ({"prune.sparsity": 0.5}, "unknown config key.*prune.sparsity"),
])
def test_bad_pruning_options(override, match):
  config = tiny_config("lra_listops", **{"prune.method": "magnitude", **override})
  with pytest.raises((ValueError, TypeError), match=match):
    validate.config(config)


def test_a_pattern_that_selects_nothing():
  config = tiny_config("lra_listops", **{"prune.method": "magnitude",
                                         "prune.include": "nothing_matches"})
  with pytest.raises(ValueError, match="select no parameter"):
    trainer.Run(config)
