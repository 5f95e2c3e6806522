"""Files of runs and sweeps, on a local disk or in a bucket (``gs://...``).

Local paths go through ``os`` exactly as before; a path with a scheme (``gs://``,
``s3://``) goes through ``etils.epath``, which needs ``gcsfs`` for ``gs://`` (``pip
install -e '.[gcs]'``, part of ``.[tpu]``). An object store replaces an object whole, so
the atomic write of a remote file is a plain write; there is no append (``metrics``
rewrites ``metrics.jsonl`` from the rows it holds, a sweep uploads each trial's log).
"""

from __future__ import annotations

import glob as glob_lib
import os
import shutil
import tempfile


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath  # noqa: PLC0415 (only for bucket paths: start-up time)

  if str(path).startswith("gs://"):
    try:
      import gcsfs  # noqa: F401, PLC0415 (an optional dependency, named when missing)
    except ImportError:
      raise OSError(f"{path}: reading and writing gs:// needs gcsfs: pip install -e "
                    "'.[gcs]'") from None
  return epath.Path(path)


def absolute(path: str) -> str:
  """A local path made absolute (``~`` expanded); a remote one unchanged."""
  path = str(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def read_text(path: str) -> str:
  if is_remote(path):
    return _epath(path).read_text(encoding="utf-8")
  with open(path, encoding="utf-8") as f:
    return f.read()


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that a reader (or a killed writer) never sees half a
  file: a local file through a temporary file and a rename, an object in one upload."""
  if is_remote(path):
    _epath(path).write_text(text, encoding="utf-8")
    return
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp",
                                   delete=False, encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())  # a crash after the rename must not leave an empty file
  os.chmod(f.name, 0o644)
  os.replace(f.name, path)


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Deletes a folder and everything in it; nothing happens when it does not exist."""
  if is_remote(path):
    if exists(path):
      _epath(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(source: str, target: str) -> None:
  """Moves a file or folder (a bucket copies and deletes: not atomic there)."""
  if is_remote(source):
    _epath(source).rename(target)
  else:
    os.replace(source, target)


def glob(folder: str, pattern: str) -> list[str]:
  """The paths in ``folder`` whose names match ``pattern``."""
  if is_remote(folder):
    return [str(p) for p in _epath(folder).glob(pattern)]
  return glob_lib.glob(os.path.join(folder, pattern))


def upload(local: str, target: str) -> None:
  """Copies a local file to ``target`` (either kind), replacing it."""
  if is_remote(target):
    _epath(target).write_bytes(open(local, "rb").read())
  else:
    shutil.copyfile(local, target)
