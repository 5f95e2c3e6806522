"""A finished (or checkpointed) run put back to use: restored, evaluated, sampled from.

``restore(workdir, checkpoint)`` rebuilds a workdir's ``Run`` from its stored config and
restores one checkpoint into it; ``evaluate_workdir`` and ``sample_workdir`` are what
``python -m effx.evaluate`` and ``python -m effx.sample`` do with it.
"""

from __future__ import annotations

import os

import numpy as np

from effx import data as data_lib
from effx.data.base import BYTE_VOCAB
from effx.models import generate
from effx.training import checkpoint as ckpt
from effx.training import defaults
from effx.training import workdir as workdir_lib
from effx.training.run import Run


def restore(workdir: str, checkpoint: str | int = "latest", *, sizes_only: bool = False):
  """One of ``workdir``'s checkpoints, ready to evaluate.

  Args:
    workdir: an ``effx.train`` workdir.
    checkpoint: ``"latest"`` (the newest that restores), ``"best"`` (the best on
      validation) or a step (int or digits).
    sizes_only: the run knows its task's sizes only, without loading its data (for an
      export: nothing is evaluated).

  Returns:
    ``(run, params, model_state, step)``: ``run`` an evaluation-only ``Run`` of
    the workdir's config (no distillation teacher loaded, except the pretrained teacher
    a sentence encoder is evaluated against).
  """
  checkpoint = str(checkpoint)
  if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
    raise ValueError(f"--checkpoint={checkpoint!r}: use 'latest', 'best' or a step number")
  config = defaults.load_workdir_config(workdir)
  run = Run(config, evaluation_only=True,
            task=data_lib.describe(config.data, config.seed) if sizes_only else None)
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
  workdir_lib.write_json_atomic(os.path.join(workdir, f"eval_{split}_{name}_{step}.json"),
                                result)
  return result


def sample_workdir(workdir: str, prompts: list[str], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                   checkpoint: str = "best", recompute: bool = False) -> list[str]:
  """The continuation (text) of each prompt by ``workdir``'s model (``effx.models.generate``)."""
  run, params, model_state, _ = restore(workdir, checkpoint)
  if run.model_config.kind != "causal_lm" or run.model_config.vocab_size != BYTE_VOCAB:
    raise ValueError(f"{workdir} holds a {run.model_config.kind} model with vocabulary "
                     f"{run.model_config.vocab_size}; effx.sample reads byte-level causal "
                     "LMs (data.task='lm'); call effx.models.generate.generate for token ids")
  if not prompts or any(not p for p in prompts):
    raise ValueError("--prompt must be a non-empty string")
  tokens = [np.frombuffer(p.encode("utf-8"), np.uint8).astype(np.int32) + 1 for p in prompts]
  model = run.model
  out = generate.generate(model, params, tokens, max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed, recompute=recompute,
                          model_state=model_state)
  return [bytes((o - 1).astype(np.uint8)).decode("utf-8", errors="replace") for o in out]
