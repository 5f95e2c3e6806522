"""What every effx benchmark shares: isolated measurements, device facts, a roofline,
timing statistics, and the output folder (CSV, PNGs, README with the command).

Each configuration is measured in a fresh subprocess: a crash, an out-of-memory kill or a
hang costs that configuration only (recorded as ``oom`` / ``timeout`` / ``error``), and
the subprocess's peak RSS is the configuration's host-memory figure on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def parse_lengths(text: str) -> list[int]:
  """``"512,1024"`` -> ``[512, 1024]``; non-positive or non-integer lengths raise."""
  lengths = []
  for part in text.split(","):
    try:
      value = int(part)
    except ValueError:
      raise ValueError(f"--lengths: {part!r} is not an integer") from None
    if value <= 0:
      raise ValueError(f"--lengths: {value} is not a positive length")
    lengths.append(value)
  return lengths


def time_call(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
  """Median, min and max seconds of ``fn()`` over ``repeat`` runs after one warm-up
  (compilation is never timed); results are blocked on."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeat):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"time_median_s": statistics.median(times), "time_min_s": min(times),
          "time_max_s": max(times)}


def peak_bytes() -> int:
  """This process's peak memory: device peak bytes on an accelerator, else peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_info() -> dict[str, str]:
  d = jax.devices()[0]
  return {"device": f"{jax.device_count()} x {d.device_kind} ({d.platform})",
          "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else "",
          "python": platform.python_version(), "cpu_count": str(os.cpu_count())}


def roofline(dtype=jnp.float32) -> dict[str, float]:
  """Measured ceilings: large-matmul FLOP/s and copy bandwidth (bytes/s) of device 0."""
  n = 2048 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a: a @ a)
  t = time_call(lambda: matmul(a), 5)["time_median_s"]
  x = jnp.ones((64 * 2**20 // jnp.dtype(dtype).itemsize,), dtype)
  copy = jax.jit(lambda x: x * 1.0001)
  tc = time_call(lambda: copy(x), 5)["time_median_s"]
  return {"matmul_flops_per_s": 2 * n**3 / t, "copy_bytes_per_s": 2 * x.nbytes / tc}


def run_isolated(module: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Runs ``python -m <module> --worker=<spec json>`` and returns the JSON it prints last;
  failures come back as ``{"status": "oom" | "timeout" | "error", "detail": ...}``."""
  cmd = [sys.executable, "-m", module, f"--worker={json.dumps(spec)}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "detail": f"over {timeout_s:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  tail = (proc.stderr or proc.stdout)[-400:]
  oom = (proc.returncode in (-9, 137) or "RESOURCE_EXHAUSTED" in tail
         or "MemoryError" in tail or "Out of memory" in tail)
  return {"status": "oom" if oom else "error", "detail": tail.strip().splitlines()[-1:]}


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c, "") for c in columns})


def command_line() -> str:
  return "python -m " + " ".join(shlex.quote(a) for a in [_module_name(), *sys.argv[1:]])


def _module_name() -> str:
  main = sys.modules["__main__"]
  spec = getattr(main, "__spec__", None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def available_memory_bytes() -> int | None:
  """Free host memory (Linux ``MemAvailable``), to skip configurations that cannot fit."""
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None
