"""effx: efficient transformers in JAX/Flax."""

__version__ = "0.1.0"


def train_and_evaluate(config, workdir: str):
  """Trains and evaluates ``config`` (an LRA training ConfigDict) in ``workdir``; see
  ``effx.trainer.train_and_evaluate``. Imported lazily so that ``import effx.attention``
  does not load the training stack."""
  from effx.trainer import train_and_evaluate as run  # noqa: PLC0415

  return run(config, workdir)
