"""Evaluate a checkpoint of a training run.

  python -m effx.evaluate --workdir=/tmp/listops [--split=test] [--checkpoint=latest]

``--checkpoint``: ``latest`` (default: the newest checkpoint that restores), ``best``
(the best-on-validation parameters) or a step number. Prints the accuracy with the
checkpoint it used and writes ``workdir/eval_<split>_<checkpoint>_<step>.json``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as a program: importing this module (effx.structured does) must not
  # define flags another entry point also defines.
  flags.DEFINE_string("workdir", None, "an effx.train workdir", required=True)
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "split to evaluate")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number")


def restore(workdir: str, checkpoint: str | int = "latest"):
  """One of ``workdir``'s checkpoints, ready to evaluate.

  Args:
    workdir: an ``effx.train`` workdir.
    checkpoint: ``"latest"`` (the newest that restores), ``"best"`` (the best on
      validation) or a step (int or digits).

  Returns:
    ``(run, params, model_state, step)``: ``run`` an evaluation-only ``trainer.Run`` of
    the workdir's config (no distillation teacher loaded, except the pretrained teacher
    a sentence encoder is evaluated against).
  """
  from effx import checkpoint as ckpt  # noqa: PLC0415
  from effx import trainer  # noqa: PLC0415

  checkpoint = str(checkpoint)
  if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
    raise ValueError(f"--checkpoint={checkpoint!r}: use 'latest', 'best' or a step number")
  config = trainer.load_workdir_config(workdir)
  run = trainer.Run(config, evaluation_only=True)
  checkpoints = ckpt.Checkpoints(workdir, config.keep_checkpoints)
  try:
    checkpoint = resolved(config, workdir, checkpoint)
    if checkpoint == "best":
      step = checkpoints.best.latest_step()
      if step is None:
        raise FileNotFoundError(f"no best checkpoint in {workdir}/best")
      target = {"params": run.abstract_state.params,
                "model_state": run.abstract_state.model_state}
      restored = checkpoints.restore_best(target, step)
      return run, restored["params"], restored["model_state"], step
    if checkpoint == "latest":
      restored = checkpoints.restore_latest(run.abstract_state)
    else:
      restored = checkpoints.restore_step(run.abstract_state, int(checkpoint))
    if restored is None:
      raise FileNotFoundError(f"no checkpoint that restores in {checkpoints.directory}")
    state, _, _, step = restored
    return run, state.params, state.model_state, step
  finally:
    checkpoints.close()


def resolved(config, workdir: str, checkpoint: str) -> str:
  """The checkpoint ``restore`` reads for ``checkpoint``: an integer export
  (``quant.mode="int"``) holds its parameters only, as its best checkpoint."""
  checkpoint = str(checkpoint)
  if config.quant.mode != "int" or checkpoint == "best":
    return checkpoint
  if checkpoint != "latest":
    raise ValueError(f"--checkpoint={checkpoint}: {workdir} is an integer export, which "
                     "holds one checkpoint (use --checkpoint=best)")
  return "best"


def evaluate_workdir(workdir: str, split: str = "test", checkpoint: str | int = "latest"
                     ) -> dict:
  """Accuracy and loss of one of ``workdir``'s checkpoints on ``split``.

  Args:
    workdir: an ``effx.train`` workdir.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    checkpoint: ``"latest"``, ``"best"`` or a step (int or digits).

  Returns:
    ``{"checkpoint", "step", "split", "accuracy", "loss", ...}``, also written to
    ``workdir/eval_<split>_<checkpoint>_<step>.json``.
  """
  run, params, model_state, step = restore(workdir, checkpoint)
  checkpoint = resolved(run.config, workdir, checkpoint)
  name = str(checkpoint) if str(checkpoint) in ("latest", "best") else "step"
  result = {"checkpoint": name, "step": step, "split": split,
            **run.evaluate(params, model_state, split)}
  from effx import workdir as workdir_lib  # noqa: PLC0415

  workdir_lib.write_json_atomic(os.path.join(workdir, f"eval_{split}_{name}_{step}.json"),
                                result)
  return result


def main(argv):
  del argv
  from effx import cli  # noqa: PLC0415

  cli.user_errors_in_one_line(_main)()


def _main():
  from effx import cli  # noqa: PLC0415

  cli.quiet_libraries()
  result = evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint)
  logging.info("%s", result)
  print(f"{result['checkpoint']} checkpoint (step {result['step']}), {result['split']}: "
        f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
