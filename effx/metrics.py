"""Where a run reports: JSON lines, TensorBoard events, and a progress bar or log lines.

Only process 0 writes files. ``workdir/metrics.jsonl`` gets one object per report
(``{"step": ..., "split": "train" | "validation" | "test", ...}``); a resumed run may
repeat steps after its checkpoint (readers keep the last row per step and split).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax


class Writer:
  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self._enabled:
      _end_torn_line(self._jsonl)
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    with open(self._jsonl, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _end_torn_line(path: str) -> None:
  """A run killed mid-write leaves a partial last line; end it so the resumed run's rows
  start on lines of their own (``read`` skips the torn one)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")


def read(workdir: str) -> list[dict]:
  """The rows of ``metrics.jsonl``, last row per (step, split) kept, in step order.

  A line torn by a killed run is skipped (its step is reported again after the resume).
  """
  rows: dict[tuple[int, str], dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("skipping a torn line in metrics.jsonl: %r", line[:80])
        continue
      rows[(row["step"], row["split"])] = row
  return [rows[k] for k in sorted(rows)]


class Progress:
  """A tqdm bar on an interactive terminal; otherwise a log line per report."""

  def __init__(self, start: int, total: int, batch_size: int):
    self._total, self._batch = total, batch_size
    self._last_step, self._last_time = start, time.perf_counter()
    self._bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, values: dict[str, float]) -> dict[str, float]:
    """Reports training ``values`` at ``step``; returns speed figures for the log."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    speed = {"steps_per_s": rate, "examples_per_s": rate * self._batch}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                            ex_s=f"{speed['examples_per_s']:.0f}")
    elif jax.process_index() == 0:
      eta = (self._total - step) / max(rate, 1e-9)
      logging.info("step %d/%d  loss %.4f  acc %.3f  %.2f steps/s  %.0f ex/s  ETA %s", step,
                   self._total, values["loss"], values["accuracy"], rate,
                   speed["examples_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))
    return speed

  def message(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      logging.info("%s", text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
