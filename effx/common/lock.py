"""One process per workdir: an exclusive lock on ``<workdir>/.lock``.

The lock is the operating system's (``fcntl.flock`` on the open lock file), not the
file's existence: it is released when its process exits however it exits (SIGKILL
included), so a killed run never leaves a lock behind that a person must delete, and two
processes racing for a free workdir cannot both win. On a shared filesystem (NFS v4,
Lustre or GPFS mounted with lock support) the file server holds the lock the same way
and frees it when the holder's host stops renewing its lease (a crashed host: after the
lease time, ~90 s on NFS v4). The holder writes who it is into the file (host, pid,
start time, command), which the refused process names in its message; the refused
process opens the file without truncating it and writes nothing.

A bucket (``gs://``) has no locks: there the workdir is not locked, and a warning says
so (a Slurm or TPU sweep gives each trial its own workdir, so only a person starting two
runs on one bucket workdir by hand can collide).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Iterator

from effx.common import files

NAME = ".lock"


class WorkdirInUseError(OSError):
  """Another live process holds the workdir."""


def holder(workdir: str) -> dict | None:
  """Who holds (or last held) ``workdir``'s lock, from the lock file, or None."""
  try:
    with open(os.path.join(workdir, NAME), encoding="utf-8") as f:
      text = f.read()
    return json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None


def _describe(info: dict | None) -> str:
  if not info:
    return "another process (it has not written its name yet)"
  return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
          f"({info.get('command')})")


# What flock raises on a filesystem mounted without lock support.
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


@contextlib.contextmanager
def workdir_lock(workdir: str, what: str, *, create: bool = True) -> Iterator[None]:
  """Holds ``workdir``'s lock for the ``with`` block (creating the folder if needed).

  Raises ``WorkdirInUseError`` at once, naming the holder, when a live process holds it;
  ``what`` (e.g. ``"effx.train"``) is recorded for the next one's message. With
  ``create=False`` a missing folder is left missing (and not locked: the command reports
  it). A bucket, or a filesystem without locks, is used unlocked with a warning."""
  if files.is_remote(workdir):
    logging.warning("%s: a bucket has no locks; nothing stops a second process from using "
                    "this workdir at the same time", workdir)
    yield
    return
  if not create and not os.path.isdir(workdir):
    yield
    return
  path = os.path.join(workdir, NAME)
  while True:
    os.makedirs(workdir, exist_ok=True)
    # O_APPEND, not O_TRUNC: a refused process must leave the holder's record intact.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno in _NO_LOCKS:
        logging.warning("%s: this filesystem has no locks (%s); nothing stops a second "
                        "process from using this workdir at the same time", workdir, error)
        yield
        return
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirInUseError(
          f"workdir {workdir} is in use by {_describe(holder(workdir))}: one process per "
          f"workdir. Wait for it to finish (or stop it), or use another --workdir") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    # The file was removed (a failed first run deletes the workdir it made) between our
    # open and our lock: lock the file that is there now.
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([what, *sys.argv[1:]])[:500]}).encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)
    os.close(fd)  # releases the lock


def remove_if_only_locked(workdir: str) -> None:
  """Removes ``workdir`` if it holds nothing but its lock file: a command that failed
  before writing anything leaves no folder that only its lock made. Call it while
  holding the lock (so no other process is in the folder)."""
  if files.is_remote(workdir) or not os.path.isdir(workdir):
    return
  if set(os.listdir(workdir)) <= {NAME}:
    with contextlib.suppress(OSError):
      os.remove(os.path.join(workdir, NAME))
      os.rmdir(workdir)
