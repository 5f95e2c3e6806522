"""Pathfinder and Path-X: are the two marker dots joined by one dashed contour?

Two sources of images, one batch contract (``inputs`` = pixel ``p`` as token ``p + 1``,
``[resolution**2]``, 0 reserved for padding; ``targets`` 1 if connected):

* **LRA release files** (``data.dir`` = the unpacked ``lra_release`` folder):
  ``<dir>/pathfinder<resolution>/<difficulty>/metadata/*.npy`` are text files despite
  the suffix, one image per line, ``imgs/<k> sample_<n>.png <index> <label> ...``
  (label in field 3), naming ``imgs/<k>/sample_<n>.png``. The splits are LRA's, image
  for image: LRA's TFDS builder (``lra_benchmarks/data/pathfinder.py``) puts a whole
  difficulty in one split (``curv_baseline`` "easy", ``curv_contour_length_9``
  "intermediate", ``curv_contour_length_14`` "hard") keyed ``<k dir>_<file>_<row>``
  (row counted from 1 in its metadata file, whatever the file's name); TFDS stores a
  split sorted by the md5 of split name + key, and ``image/input_pipeline.py`` takes
  ``[:80%]`` / ``[80%:90%]`` / ``[90%:]`` of it (TFDS rounds to the nearest example),
  then drops empty images (the release has one,
  ``pathfinder32/curv_baseline/imgs/0/sample_172.png``). effx sorts the same way without
  TFDS. PNGs are decoded as stored, like LRA's ``tf.image.decode_png``: they must be
  8-bit grayscale of the requested size, or reading one raises naming the file. Path-X
  is the 128x128 release; LRA's code defines 128 px tasks at all three difficulties
  without pinning the paper's, and effx reads ``curv_contour_length_14`` unless
  ``data.difficulty`` says otherwise. Where effx deliberately differs: tokens are
  ``pixel + 1`` (LRA fed pixels 0..255 with no padding id); blank metadata lines are
  skipped and a last line without a newline is read (LRA's builder splits on newlines
  and drops the last piece, so it fails on a trailing blank line and loses an
  unterminated last row); a listed image that is missing raises before training
  instead of when the builder reads it.
* **effx's generator** (``data.dir`` unset): each image is drawn on demand from
  ``(seed, split, index)``, so the data are deterministic, need no disk, and labels are
  exactly balanced (``index % 2``). A contour is a chain of ``contour_length`` paddles
  (dashes) of ``paddle_length`` pixels with gaps, turning by at most 60 degrees between
  paddles; a positive image puts the markers on the two ends of one contour, a negative
  one on ends of two different contours; ``num_distractors`` shorter contours add
  clutter. Drawn 4x supersampled, then box-filtered (anti-aliased). Each split is drawn
  once (in parallel for large splits) and cached under ``data.cache_dir``.

Each source reads only its own keys; ``check`` rejects the other source's keys when
they are set, so no setting is silently ignored.
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
from collections.abc import Mapping
from typing import Any

import numpy as np

from effx.data.base import BYTE_VOCAB, DatasetMissingError, TaskData, reject_generator_keys

_log = logging.getLogger(__name__)

# None: the generator's default below / in PRESETS, or for ``difficulty`` the release's
# ``curv_contour_length_14``; None also lets ``check`` tell a key that was set.
DEFAULTS = dict(resolution=32, difficulty=None, contour_length=None, paddle_length=None,
                thickness=None, marker_radius=None, num_distractors=None, num_train=None,
                num_valid=None, num_test=None, cache_dir=None)
# Read by the generator only (cache_dir None: ~/.cache/effx).
GENERATOR_KEYS = ("contour_length", "paddle_length", "thickness", "marker_radius",
                  "num_distractors", "num_train", "num_valid", "num_test", "cache_dir")
GENERATOR_DEFAULTS = dict(contour_length=14, num_distractors=2, num_train=160_000,
                          num_valid=20_000, num_test=20_000)
# Published settings: 32x32 paddle 2 / thickness 0.5 / markers 1.5; 128x128 thickness
# 1.5 / markers 3 (paddle length scaled with the canvas).
PRESETS = {32: dict(paddle_length=2.0, thickness=0.5, marker_radius=1.5),
           128: dict(paddle_length=6.0, thickness=1.5, marker_radius=3.0)}
# Release folder -> LRA's TFDS split name, the salt of the order TFDS stores it in.
DIFFICULTIES = {"curv_baseline": "easy", "curv_contour_length_9": "intermediate",
                "curv_contour_length_14": "hard"}
RELEASE_DIFFICULTY = "curv_contour_length_14"
RELEASE_RESOLUTIONS = (32, 64, 128, 256)
_TYPES = dict(difficulty=str, contour_length=int, paddle_length=float, thickness=float,
              marker_radius=float, num_distractors=int, num_train=int, num_valid=int,
              num_test=int, cache_dir=str)
_SUPERSAMPLE = 4
_MAX_TURN = np.pi / 3
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def check(data: Mapping[str, Any]) -> None:
  """Raises on a key the chosen source would not read, or a value it cannot use.

  Args:
    data: every ``config.data`` key, defaults filled in.
  """
  for key, kind in _TYPES.items():  # effx.data type-checks keys with non-None defaults only
    value = data[key]
    if value is not None and (isinstance(value, bool) or not isinstance(
        value, (int, float) if kind is float else kind)):
      raise TypeError(f"data.{key}={value!r} must be a {kind.__name__}")
  n, difficulty = data["resolution"], data["difficulty"]
  if difficulty is not None and difficulty not in DIFFICULTIES:
    raise ValueError(f"data.difficulty={difficulty!r} is not a folder of the LRA release; "
                     f"one of {', '.join(DIFFICULTIES)}")
  reject_generator_keys(
      data, GENERATOR_KEYS, task="Pathfinder", source="the LRA release",
      instead="draw images",
      hint="configs/lra_pathfinder.py and lra_pathx.py set some of them: give those "
           "configs the release folder as their argument instead, e.g. "
           "--config=configs/lra_pathx.py:dir=<lra_release>")
  if data["dir"]:
    if n not in RELEASE_RESOLUTIONS:
      raise ValueError(f"data.resolution={n}: the LRA release has pathfinder"
                       f"{{{','.join(map(str, RELEASE_RESOLUTIONS))}}} only")
    return
  if difficulty is not None:
    raise ValueError(f"data.difficulty={difficulty!r} picks a folder of the LRA release and "
                     "is read only with data.dir set; the generator's difficulty is "
                     "data.contour_length (paddles per contour: 9 and 14 in the release's "
                     "curv_contour_length_9 and _14)")
  if n not in PRESETS and any(data[k] is None for k in PRESETS[32]):
    raise ValueError(f"data.resolution={n} has no published preset ({sorted(PRESETS)}); "
                     "set data.paddle_length, data.thickness and data.marker_radius")


def generator_settings(data: Mapping[str, Any]) -> dict[str, Any]:
  """The generator keys of ``data`` with each None replaced by its default."""
  defaults = {**GENERATOR_DEFAULTS, **PRESETS.get(data["resolution"], {}), "cache_dir": None}
  return {k: defaults[k] if data[k] is None else data[k] for k in GENERATOR_KEYS}


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
    from tqdm import tqdm

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
  """Images of the LRA release, ``(path relative to root, label)`` each."""

  def __init__(self, root: str, examples: list[tuple[str, int]], resolution: int):
    self._root, self._examples, self._n = root, examples, resolution

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    from PIL import Image

    path, label = self._examples[index]
    full = os.path.join(self._root, path)
    try:
      with Image.open(full) as image:
        mode, size = image.mode, image.size
        pixels = np.asarray(image, np.uint8) if mode == "L" else None
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
      raise ValueError(f"{full}: not a readable image ({error})") from None
    if mode != "L":
      raise ValueError(f"{full}: image mode {mode!r}; the LRA release's PNGs are 8-bit "
                       "grayscale ('L')")
    if pixels.shape != (self._n, self._n):
      raise ValueError(f"{full}: image is {size[0]}x{size[1]}, expected "
                       f"{self._n}x{self._n} for data.resolution={self._n}")
    return {"inputs": pixels.reshape(-1).astype(np.int32) + 1, "targets": np.int32(label)}


def _metadata_order(path: str) -> tuple[bool, int, str]:
  """Integer names numerically, then any other name (LRA reads every ``*.npy``); the
  reading order does not change LRA's, which sorts by key."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return (not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem)


def release_examples(root: str, difficulty: str) -> list[tuple[str, int]]:
  """Every image listed in ``root/metadata/*.npy``, in the order LRA's TFDS split has.

  Args:
    root: ``<lra_release>/pathfinder<resolution>/<difficulty>``.
    difficulty: the folder name, a key of ``DIFFICULTIES`` (it salts the order).

  Returns:
    ``(image path relative to root, label)`` for every non-blank metadata line, empty
    images included (LRA drops them after splitting), sorted by the md5 TFDS gives
    the key ``<k dir>_<file>_<row>`` salted with LRA's split name.
  """
  files = sorted(glob.glob(os.path.join(root, "metadata", "*.npy")), key=_metadata_order)
  if not files:
    raise DatasetMissingError(f"no metadata/*.npy files under {root}")
  salt = hashlib.md5(DIFFICULTIES[difficulty].encode())
  keyed = []
  for name in files:
    row = 0
    try:
      with open(name, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          fields = line.split()
          if not fields:
            continue
          if len(fields) < 4 or fields[3] not in ("0", "1"):
            raise ValueError(f"{name}, line {number}: {line.strip()!r} is not "
                             "'<dir> <file> <index> <label 0 or 1> ...'")
          row += 1
          digest = salt.copy()
          digest.update("_".join([fields[0], fields[1], str(row)]).encode())
          keyed.append((digest.digest(), f"{fields[0]}/{fields[1]}", int(fields[3])))
    except UnicodeDecodeError:
      raise ValueError(f"{name}: not a text file; the LRA release's metadata/*.npy are "
                       "text, one image per line") from None
  keyed.sort()
  return [(path, label) for _, path, label in keyed]


def release_splits(root: str, examples: list[tuple[str, int]]
                   ) -> dict[str, list[tuple[str, int]]]:
  """LRA's ``[:80%]``, ``[80%:90%]``, ``[90%:]`` of ``examples``, then empty images
  dropped; a listed image that does not exist raises."""
  sizes, missing = {}, []
  for path, _ in examples:
    try:
      sizes[path] = os.path.getsize(os.path.join(root, path))
    except FileNotFoundError:
      missing.append(path)
  if missing:
    raise DatasetMissingError(
        f"{len(missing)} image(s) listed in {root}/metadata are missing, e.g. "
        f"{', '.join(missing[:3])}; is the release fully unpacked?")
  n = len(examples)
  a, b = (round(percent * n / 100.0) for percent in (80.0, 90.0))  # TFDS "closest"
  parts = {"train": examples[:a], "validation": examples[a:b], "test": examples[b:]}
  for split, part in parts.items():
    for path, _ in part:
      if sizes[path] == 0:
        _log.warning("Pathfinder %s: skipping empty image %s", split, path)
    parts[split] = [e for e in part if sizes[e[0]] > 0]
  return parts


def load(data, seed: int) -> TaskData:
  """Release files when ``data.dir`` is set, else generated images (see the module).

  Args:
    data: ``config.data`` of task ``pathfinder``, every key present.
    seed: seeds the generator; the release's splits are fixed.

  Returns:
    ``TaskData`` with ``max_len = resolution**2`` and 2 classes.
  """
  check(dict(data))
  n = data.resolution
  if data.dir:
    difficulty = data.difficulty or RELEASE_DIFFICULTY
    root = os.path.join(data.dir, f"pathfinder{n}", difficulty)
    if not os.path.isdir(root):
      raise DatasetMissingError(
          f"Pathfinder release folder {root} not found. Download "
          "https://storage.googleapis.com/long-range-arena/lra_release.gz, unpack it and "
          "pass --config.data.dir=<lra_release>/lra_release; or unset data.dir to use "
          "effx's generator")
    parts = release_splits(root, release_examples(root, difficulty))
    splits = {k: ReleaseSource(root, v, n) for k, v in parts.items()}
  else:
    s = generator_settings(data)
    generator = Generator(n, s["contour_length"], s["paddle_length"], s["thickness"],
                          s["marker_radius"], s["num_distractors"])
    sizes = {"train": s["num_train"], "validation": s["num_valid"], "test": s["num_test"]}
    splits = {k: GeneratedSource(generator, seed, k, size, s["cache_dir"])
              for k, size in sizes.items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=2, max_len=n * n)
