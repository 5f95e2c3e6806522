"""Evaluate the newest checkpoint of a training run.

  python -m effx.evaluate --workdir=/tmp/listops [--split=test]

Prints the accuracy and writes ``workdir/eval_<split>_<step>.json``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "an effx.train workdir", required=True)
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "split to evaluate")
flags.DEFINE_bool("best", False, "evaluate the best-on-validation checkpoint instead")


def evaluate_workdir(workdir: str, split: str = "test", best: bool = False) -> dict:
  """Accuracy and loss of ``workdir``'s newest (or best) checkpoint on ``split``."""
  from effx import checkpoint as ckpt  # noqa: PLC0415
  from effx import trainer  # noqa: PLC0415

  config = trainer.load_workdir_config(workdir)
  run = trainer.Run(config)
  checkpoints = ckpt.Checkpoints(workdir, config.keep_checkpoints)
  if best:
    step = checkpoints.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint in {workdir}/best")
    target = {"params": run.abstract_state.params,
              "model_state": run.abstract_state.model_state}
    restored = checkpoints.restore_best(target, step)
    params, model_state = restored["params"], restored["model_state"]
  else:
    restored = checkpoints.restore_latest(run.abstract_state)
    if restored is None:
      raise FileNotFoundError(f"no checkpoint that restores in {checkpoints.directory}")
    state, _, _, step = restored
    params, model_state = state.params, state.model_state
  checkpoints.close()
  result = {"step": step, "split": split, "best": best,
            **run.evaluate(params, model_state, split, whole=True)}
  with open(os.path.join(workdir, f"eval_{split}_{step}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result


def main(argv):
  del argv
  from effx.train import quiet_libraries  # noqa: PLC0415

  quiet_libraries()
  result = evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.best)
  logging.info("%s", result)
  print(f"step {result['step']} {result['split']}: accuracy {result['accuracy']:.4f}, "
        f"loss {result['loss']:.4f}")


if __name__ == "__main__":
  app.run(main)
