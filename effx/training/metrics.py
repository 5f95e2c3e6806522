"""Where a run reports: JSON lines, TensorBoard events, and a progress bar or log lines.

Only process 0 writes files. ``workdir/metrics.jsonl`` gets one object per report
(``{"step": ..., "split": "train" | "validation" | "test", ...}``). A run resumed from
step ``s`` first drops the rows past ``s`` (the killed session's steps, redone now) and
the final test rows (redone at the end), and rebuilds ``workdir/tensorboard`` from the
rows kept as one event file: each (split, step) appears once in both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from effx.common import files


class Writer:
  """Appends reports to ``metrics.jsonl`` and TensorBoard.

  ``resume_step``: the step the run resumes from (0 for a new run); rows past it and
  test rows are dropped first, and TensorBoard is rebuilt from the rows kept.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self._enabled = jax.process_index() == 0
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      kept = _truncate(self._jsonl, resume_step)
      # A bucket has no append: the rows are kept here and the object rewritten whole.
      self._remote_rows = ([json.dumps(row) + "\n" for row in kept]
                           if files.is_remote(self._jsonl) else None)
      tb_dir = os.path.join(workdir, "tensorboard")
      old_events = (files.glob(tb_dir, "events.out.tfevents.*") if files.isdir(tb_dir)
                    else [])
      # Events go to a local file, copied to a bucket at every flush.
      self._tb_remote = tb_dir if files.is_remote(tb_dir) else None
      # A name of its own: an old file of the same name would be truncated, then deleted.
      self._tb_local = tempfile.mkdtemp(prefix="effx-tb-") if self._tb_remote else None
      self._tb = SummaryWriter(self._tb_local or tb_dir,
                               filename_suffix=f".{os.getpid()}.{time.time_ns()}")
      for row in kept:
        for name, value in row.items():
          if name not in ("step", "split"):
            self._tb.add_scalar(f"{row['split']}/{name}", value, row["step"])
      self._flush()
      for path in old_events:  # their rows are in the new file (or were dropped above)
        files.remove(path)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    if self._remote_rows is None:
      with open(self._jsonl, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    else:
      self._remote_rows.append(json.dumps(row) + "\n")
      files.write_text_atomic(self._jsonl, "".join(self._remote_rows))
    for name, value in values.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._flush()

  def _flush(self) -> None:
    self._tb.flush()
    if self._tb_remote:
      local = self._tb.file_writer.get_logdir()
      for name in os.listdir(local):
        files.upload(os.path.join(local, name), os.path.join(self._tb_remote, name))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if self._tb_local:  # the local copy of a bucket's events, uploaded at every flush
        shutil.rmtree(self._tb_local, ignore_errors=True)


def _rows(path: str) -> list[dict]:
  rows = []
  for line in files.read_text(path).splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
      logging.warning("skipping a torn line in metrics.jsonl: %r", line[:80])
  return rows


def _truncate(path: str, step: int) -> list[dict]:
  """Rewrites ``path`` (atomically) without rows past ``step``, test rows and torn
  lines; returns the rows kept."""
  if not files.exists(path):
    return []
  rows = [r for r in _rows(path) if r["step"] <= step and r["split"] != "test"]
  files.write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
  return rows


def read(workdir: str) -> list[dict]:
  """The rows of ``metrics.jsonl`` in (step, split) order; a line torn by a killed run
  is skipped (its step is reported again after the resume), and should a row repeat,
  the last one counts."""
  rows = {(row["step"], row["split"]): row
          for row in _rows(os.path.join(workdir, "metrics.jsonl"))}
  return [rows[k] for k in sorted(rows)]


class Progress:
  """A tqdm bar on an interactive terminal; otherwise a log line per report."""

  def __init__(self, start: int, total: int, batch_size: int,
               shown: tuple[str, ...] = ("loss", "accuracy")):
    """``shown``: the training metrics on each line, in order."""
    self._total, self._batch, self._shown = total, batch_size, shown
    self._last_step, self._last_time = start, time.perf_counter()
    self._bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, values: dict[str, float]) -> dict[str, float]:
    """Reports training ``values`` at ``step``; returns speed figures for the log."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    speed = {"steps_per_s": rate, "examples_per_s": rate * self._batch}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(**{k: f"{values[k]:.4f}" for k in self._shown},
                            ex_s=f"{speed['examples_per_s']:.0f}")
    elif jax.process_index() == 0:
      eta = (self._total - step) / max(rate, 1e-9)
      shown = "  ".join(f"{k} {values[k]:.4f}" for k in self._shown)
      logging.info("step %d/%d  %s  %.2f steps/s  %.0f ex/s  ETA %s", step, self._total,
                   shown, rate, speed["examples_per_s"],
                   time.strftime("%H:%M:%S", time.gmtime(eta)))
    return speed

  def message(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      logging.info("%s", text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
