import os
import pathlib
import shutil
import socket

import pytest

from effx import cli
from support import set_keys

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def tiny_config(name: str, **overrides):
  """``configs/<name>.py:tiny`` with quick, deterministic settings for tests."""
  config = cli.load_config(f"{CONFIGS / name}.py:tiny")
  config.update(dict(learning_rate=3e-3, warmup_steps=2, schedule="constant",
                     weight_decay=0.0, num_train_steps=30, eval_every_steps=15,
                     checkpoint_every_steps=10, log_every_steps=5, max_eval_examples=16))
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  return set_keys(config, overrides)


def free_port() -> int:
  """A local TCP port free now (for a ``jax.distributed`` coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def stand_in_cluster(count: int) -> dict[str, str]:
  """Environment variables under which ``count`` processes (each adding its own
  ``SLURM_PROCID``) join one cluster when ``jax.distributed.initialize()`` is called
  without arguments (``--distributed``): Slurm's variables, standing in for a Slurm job
  or a TPU pod's metadata, with the coordinator on a free local port."""
  return {"JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
          "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1",
          "SLURM_NTASKS": str(count), "SLURM_LOCALID": "0"}


# Every process of the session, and every subprocess it starts, shares one persistent
# compilation cache (tests/conftest.py): a run of a program compiled before, by an earlier
# run of the same test or another test, loads the executable instead of compiling it.
# The fixtures below name it for tests that ask for it.


@pytest.fixture(scope="session")
def compile_cache():
  """The environment variables of the session's compilation cache."""
  return {name: os.environ[name] for name in (
      "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_COMPILATION_CACHE_MAX_SIZE")}


@pytest.fixture
def cached_compiles(compile_cache, monkeypatch):
  """``compile_cache`` in this process's environment, for the subprocesses it starts
  (already there for the whole session: kept for the tests that name it)."""
  for name, value in compile_cache.items():
    monkeypatch.setenv(name, value)


@pytest.fixture
def cached_here():
  """Compiles in this process use the cache (they do for the whole session: kept for the
  tests that name it)."""
  yield


def listops_config(**overrides):
  """The config of ``listops_run`` (2 layers: a teacher for 1-layer students), with
  ``overrides``: tests that resume or reread that run start from it."""
  return tiny_config("lra_listops", **{"model.num_layers": 2, **overrides})


@pytest.fixture(scope="session")
def listops_run(tmp_path_factory):
  """A finished tiny ListOps run (``listops_config()``: 30 steps, checkpoints at 10, 20,
  30, validation at 15 and 30), trained once per session (per xdist worker) for the tests
  that read it: a teacher, a workdir to evaluate or export. Read it only: a test that
  writes (a resume, damage, an evaluation's json) works on ``listops_copy``."""
  from effx.training import loop  # noqa: PLC0415

  workdir = tmp_path_factory.mktemp("listops_run") / "run"
  results = loop.train_and_evaluate(listops_config(), str(workdir))
  assert results["step"] == 30
  return workdir


@pytest.fixture
def listops_copy(listops_run, tmp_path):
  """A copy of ``listops_run`` of this test's own, to resume, damage or extend."""
  return pathlib.Path(shutil.copytree(listops_run, tmp_path / "run"))


@pytest.fixture
def retrieval_dir(tmp_path):
  for split in ("train", "eval", "test"):
    rows = [f"{n % 2}\ta{n}\tb{n}\t{'xy' * (n + 1)} paper\t{'q' * n} other" for n in range(16)]
    (tmp_path / f"new_aan_pairs.{split}.tsv").write_text("\n".join(rows) + "\n")
  return str(tmp_path)


@pytest.fixture(scope="session")
def _storage_emulator():
  """A Cloud Storage server in this process (``gcp-storage-emulator``, in memory), with
  the two gaps that matter here filled: downloads carry the object's generation (the
  tensorstore under orbax reads it for its conditional writes) and objects can be moved
  (gcsfs renames with ``moveTo``, otherwise retried for ~30 s before copying)."""
  import logging  # noqa: PLC0415

  emulator = pytest.importorskip("gcp_storage_emulator.server")
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      stored = storage.get_file_obj(request.params["bucket_name"],
                                    request.params["object_id"])
      response["x-goog-generation"] = stored["generation"]
      response["x-goog-metageneration"] = stored["metageneration"]
    except objects.NotFound:
      pass
    return original(request, response, storage, *args, **kwargs)

  def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
      moved = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],
                            p["bucket_name"], p["target"])
      storage.delete_file(p["bucket_name"], p["object_id"])
      response.json(moved)
    except objects.NotFound:
      response.status = 404

  objects.download = download  # objects.get(alt=media) looks it up here
  bucket_object = r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
  emulator.HANDLERS = (
      (bucket_object + r"/moveTo/o/(?P<target>.*[^/]+)$", {"POST": move}),
      *((route, {m: download if f is original else f for m, f in methods.items()})
        for route, methods in emulator.HANDLERS))
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # expected 404s
  server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket="bucket")
  server.start()
  server._api._httpd.handle_error = lambda *args: None  # clients closing sockets early
  yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
  server.stop()


@pytest.fixture
def bucket(_storage_emulator, monkeypatch):
  """``gs://bucket`` served by the emulator, for this process and its subprocesses."""
  for name, value in {"STORAGE_EMULATOR_HOST": _storage_emulator,
                      "TENSORSTORE_GCS_HTTP_URL": _storage_emulator,
                      "FSSPEC_GCS_TOKEN": "anon",  # never look for real credentials
                      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
    monkeypatch.setenv(name, value)
  return "gs://bucket"
