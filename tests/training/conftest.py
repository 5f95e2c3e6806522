import pathlib

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
