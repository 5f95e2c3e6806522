"""Sweeps: a grid of ``effx.train`` runs from one config file (``python -m effx.sweep``).

* ``trials``: a config's ``sweep_<name>`` run into checked trials and their commands.
* ``manifest``: ``sweep.json``, each trial's results and logs.
* ``local``, ``slurm``, ``tpu``: where the trials run.
* ``report``: the results as tables and plots.
"""
