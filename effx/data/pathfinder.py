"""Pathfinder and Path-X: are the two marker dots joined by one dashed contour?

Two sources of images, same batch contract (``inputs`` = pixel ``p`` as token ``p + 1``,
``[resolution**2]``; ``targets`` 1 if connected):

* **Release files** (``data.dir`` set): ``<dir>/pathfinder<res>/<difficulty>/imgs/<k>/
  sample_<n>.png`` listed by ``metadata/<k>.npy`` (text lines ``imgs/<k> sample_<n>.png
  <...> <label> ...``), split 80/10/10 in metadata order as LRA did. Unreadable or empty
  images (the release has one) are skipped with a warning.
* **effx's generator** (``data.dir`` unset): each image is drawn on demand from
  ``(seed, split, index)``, so the data are deterministic, need no disk, and labels are
  exactly balanced (``index % 2``). A contour is a chain of ``contour_length`` paddles
  (dashes) of ``paddle_length`` pixels with gaps, turning by at most 60 degrees between
  paddles; a positive image puts the markers on the two ends of one contour, a negative
  one on ends of two different contours; ``num_distractors`` shorter contours add
  clutter. Drawn 4x supersampled, then box-filtered (anti-aliased). Each split is drawn
  once (in parallel for large splits) and cached under ``data.cache_dir``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile

import numpy as np

from effx.data.base import BYTE_VOCAB, DatasetMissingError, TaskData

DEFAULTS = dict(resolution=32, difficulty="curv_contour_length_14", contour_length=14,
                paddle_length=None, thickness=None, marker_radius=None, num_distractors=2,
                num_train=160_000, num_valid=20_000, num_test=20_000, cache_dir=None)
# Published settings: 32x32 paddle 2 / thickness 0.5 / markers 1.5; 128x128 thickness
# 1.5 / markers 3 (paddle length scaled with the canvas).
PRESETS = {32: dict(paddle_length=2.0, thickness=0.5, marker_radius=1.5),
           128: dict(paddle_length=6.0, thickness=1.5, marker_radius=3.0)}
_SUPERSAMPLE = 4
_MAX_TURN = np.pi / 3
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


class Generator:
  """Draws image ``index`` of a split; a pure function of ``(seed, split, index)``."""

  def __init__(self, resolution: int, contour_length: int, paddle_length: float,
               thickness: float, marker_radius: float, num_distractors: int):
    if resolution < 16:
      raise ValueError(f"data.resolution={resolution} must be at least 16")
    if contour_length < 2:
      raise ValueError(f"data.contour_length={contour_length} must be at least 2")
    self.n, self.length = resolution, contour_length
    self.paddle, self.gap = paddle_length, paddle_length * 0.5
    self.thickness, self.radius = thickness, marker_radius
    self.num_distractors = num_distractors

  def contour(self, rng: np.random.Generator, length: int, others: list[np.ndarray]):
    """Paddle end points ``[length, 2, 2]`` inside the canvas, with paddle centres at
    least 1.5 paddle lengths from those of ``others`` (``None`` if 50 walks fail)."""
    lo, hi = self.radius + 1.0, self.n - self.radius - 1.0
    cell = 1.5 * self.paddle
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for other in others:  # a coarse grid: each check looks at 9 cells, not every paddle
      for mx, my in other.mean(axis=1):
        grid.setdefault((int(mx // cell), int(my // cell)), []).append((mx, my))

    def fits(x0, y0, x1, y1):
      if min(x0, x1, y0, y1) < lo or max(x0, x1, y0, y1) > hi:
        return False
      mx, my = (x0 + x1) / 2, (y0 + y1) / 2
      cx, cy = int(mx // cell), int(my // cell)
      return not any((px - mx) ** 2 + (py - my) ** 2 < cell * cell
                     for i in (cx - 1, cx, cx + 1) for j in (cy - 1, cy, cy + 1)
                     for px, py in grid.get((i, j), ()))

    stride = self.paddle + self.gap
    for _ in range(50):
      x, y = rng.uniform(lo, hi, size=2)
      angle = rng.uniform(0, 2 * np.pi)
      points = []
      for i in range(length):
        for _ in range(10):  # steer: redraw the turn while the paddle would leave or collide
          turn = angle + (rng.uniform(-_MAX_TURN, _MAX_TURN) if i else 0.0)
          dx, dy = math.cos(turn), math.sin(turn)
          if fits(x, y, x + self.paddle * dx, y + self.paddle * dy):
            break
        else:
          break
        angle = turn
        points.append(((x, y), (x + self.paddle * dx, y + self.paddle * dy)))
        x, y = x + stride * dx, y + stride * dy
      if len(points) == length:
        return np.asarray(points)
    return None

  def __call__(self, seed: int, split: str, index: int) -> np.ndarray:
    """``[resolution, resolution]`` uint8 image; its label is ``index % 2``."""
    label = index % 2
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    for _ in range(100):
      contours: list[np.ndarray] = []
      for size in [self.length] * 2 + [max(2, self.length // 3)] * self.num_distractors:
        c = self.contour(rng, size, contours)
        if c is None:
          break
        contours.append(c)
      else:
        break
    else:
      raise ValueError(f"cannot fit two contours of {self.length} paddles of length "
                       f"{self.paddle} on a {self.n}x{self.n} canvas; lower "
                       "data.contour_length or data.paddle_length")
    a, b = contours[0], contours[1]
    markers = [a[0, 0], a[-1, 1]] if label else [a[0, 0], b[-1, 1]]
    s = _SUPERSAMPLE
    canvas = np.zeros((self.n * s, self.n * s), np.float32)
    for c in contours:
      for p0, p1 in c:
        _segment(canvas, p0 * s, p1 * s, max(self.thickness * s, 1.0))
    for m in markers:
      _disc(canvas, m * s, self.radius * s)
    image = canvas.reshape(self.n, s, self.n, s).mean(axis=(1, 3))
    return np.rint(255 * image).astype(np.uint8)


def _segment(canvas, p0, p1, width):
  lo = np.floor(np.minimum(p0, p1) - width).astype(int).clip(0, canvas.shape[0] - 1)
  hi = np.ceil(np.maximum(p0, p1) + width).astype(int).clip(0, canvas.shape[0] - 1)
  ys, xs = np.mgrid[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] + 0.5
  d = p1 - p0
  t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
  near = np.hypot(xs - p0[0] - t * d[0], ys - p0[1] - t * d[1]) <= width / 2
  canvas[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1][near] = 1.0


def _disc(canvas, center, radius):
  _segment(canvas, center, center, 2 * radius)


class GeneratedSource:
  """A generated split, drawn once into a cached ``uint8 [size, n, n]`` ``.npy`` file
  (memory-mapped): training reads pixels instead of redrawing them every epoch."""

  def __init__(self, generator: Generator, seed: int, split: str, size: int,
               cache_dir: str | None):
    self._images = _cached_images(generator, seed, split, size, cache_dir)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self._images):
      raise IndexError(index)
    image = self._images[index]
    return {"inputs": image.reshape(-1).astype(np.int32) + 1, "targets": np.int32(index % 2)}


def _draw(args) -> np.ndarray:
  generator, seed, split, start, stop = args
  return np.stack([generator(seed, split, i) for i in range(start, stop)])


def _cached_images(generator: Generator, seed: int, split: str, size: int,
                   cache_dir: str | None) -> np.ndarray:
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effx")
  key = hashlib.sha1(json.dumps([vars(generator), seed, split, size], sort_keys=True)
                     .encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, f"pathfinder{generator.n}_{split}_{key}.npy")
  if not os.path.exists(path):
    from tqdm import tqdm  # noqa: PLC0415

    os.makedirs(cache_dir, exist_ok=True)
    chunk = 256
    jobs = [(generator, seed, split, a, min(a + chunk, size)) for a in range(0, size, chunk)]
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp.npy")
    os.close(fd)
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                       shape=(size, generator.n, generator.n))
    workers = min(os.cpu_count() or 1, len(jobs))
    with tqdm(total=size, desc=f"Pathfinder {split}", unit="img", disable=None) as bar:
      if workers > 1 and size >= 4 * chunk:
        # spawn, not fork: the parent may already run JAX threads
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
          for (_, _, _, a, b), block in zip(jobs, pool.imap(_draw, jobs)):
            images[a:b] = block
            bar.update(b - a)
      else:
        for job in jobs:
          images[job[3]:job[4]] = _draw(job)
          bar.update(job[4] - job[3])
    images.flush()
    del images
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-drawn cache
  return np.load(path, mmap_mode="r")


class ReleaseSource:
  """Images listed by the LRA release's metadata files."""

  def __init__(self, root: str, examples: list[tuple[str, int]], resolution: int):
    self._root, self._examples, self._n = root, examples, resolution

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    from PIL import Image  # noqa: PLC0415

    path, label = self._examples[index]
    with Image.open(os.path.join(self._root, path)) as image:
      pixels = np.asarray(image.convert("L"), np.uint8)
    if pixels.shape != (self._n, self._n):
      raise ValueError(f"{path}: image is {pixels.shape}, expected {(self._n, self._n)}")
    return {"inputs": pixels.reshape(-1).astype(np.int32) + 1, "targets": np.int32(label)}


def release_examples(root: str) -> list[tuple[str, int]]:
  """``(relative path, label)`` for every listed, non-empty image under ``root``."""
  files = sorted(glob.glob(os.path.join(root, "metadata", "*.npy")),
                 key=lambda f: int(os.path.splitext(os.path.basename(f))[0]))
  if not files:
    raise DatasetMissingError(f"no metadata/<k>.npy files under {root}")
  examples, skipped = [], []
  for name in files:
    with open(name, encoding="utf-8") as f:
      for line in f:
        fields = line.split()
        if len(fields) < 4:
          continue
        path = os.path.join(fields[0], fields[1])
        full = os.path.join(root, path)
        if not os.path.exists(full) or os.path.getsize(full) == 0:
          skipped.append(path)
          continue
        examples.append((path, int(fields[3])))
  for path in skipped:
    logging.warning("Pathfinder: skipping empty or missing image %s", path)
  return examples


def load(data, seed: int) -> TaskData:
  n = data.resolution
  if n not in PRESETS and None in (data.paddle_length, data.thickness, data.marker_radius):
    raise ValueError(f"data.resolution={n} has no published preset ({sorted(PRESETS)}); "
                     "set data.paddle_length, data.thickness and data.marker_radius")
  if data.dir:
    root = os.path.join(data.dir, f"pathfinder{n}", data.difficulty)
    if not os.path.isdir(root):
      raise DatasetMissingError(
          f"Pathfinder release folder {root} not found. Download "
          "https://storage.googleapis.com/long-range-arena/lra_release.gz, unpack it and "
          "pass --config.data.dir=<lra_release>/lra_release; or unset data.dir to use "
          "effx's generator")
    examples = release_examples(root)
    a, b = int(0.8 * len(examples)), int(0.9 * len(examples))
    parts = {"train": examples[:a], "validation": examples[a:b], "test": examples[b:]}
    splits = {k: ReleaseSource(root, v, n) for k, v in parts.items()}
  else:
    preset = PRESETS.get(n, {})
    options = {k: getattr(data, k) if getattr(data, k) is not None else preset[k]
               for k in ("paddle_length", "thickness", "marker_radius")}
    generator = Generator(n, data.contour_length, num_distractors=data.num_distractors,
                          **options)
    sizes = {"train": data.num_train, "validation": data.num_valid, "test": data.num_test}
    splits = {k: GeneratedSource(generator, seed, k, size, data.cache_dir)
              for k, size in sizes.items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=2, max_len=n * n)
