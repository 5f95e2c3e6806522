"""Sweeps across LRA's tasks, read as LRA's Table 1 (a row per family, a column per task).

  python -m effx.sweep --config=configs/lra.py:small --workdir=/tmp/lra --sweep=families
  python -m effx.sweep --config=configs/lra.py --workdir=gs://BUCKET/lra --sweep=families \\
      --launcher=tpu --tpu=NAME --zone=ZONE --accelerator=v5litepod-16

The argument (``:tiny``, ``:small``, none for LRA's settings) is passed to every task's
config file; each trial runs that file's config (``config=`` in ``add``), so this file has
no config of its own. Path-X (``lra_pathx.py``) is left out as in LRA's Table 1, where
every model failed it; ``tasks=`` below takes it in.
"""

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


def sweep_families(add, arg=None, tasks=TASKS):
  """Every attention family at its defaults on every task (16 x 5 trials)."""
  from effx.attention import registry  # noqa: PLC0415

  for task in tasks:
    for family in registry.names():
      add(**{"config": f"lra_{task}.py" + (f":{arg}" if arg else ""),
             "model.attention": family})
