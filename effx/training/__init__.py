"""The one training loop and what it stands on.

* ``loop``: ``train_and_evaluate(config, workdir)``, resume, signals, best checkpoint.
* ``run``: ``Run``, a config's model, sharded state, objective and compiled steps.
* ``defaults`` / ``validate``: every config key with its default; every check of a
  config before anything is loaded or compiled.
* ``objectives``: classification, language modelling, distillation; ``teachers``: the
  distillation teacher, loaded and checked.
* ``steps``, ``optim``, ``sharding``, ``checkpoint``, ``metrics``, ``workdir``: the step
  functions, optimizer, mesh, orbax checkpoints, metric writers, one run per workdir.
* ``restore`` (evaluate or sample from a run), ``exports`` (int8 and shrunk workdirs),
  ``aot`` (compile for a TPU topology ahead of time).
"""
