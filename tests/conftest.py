"""Test-wide settings.

* Tests compile many small programs and run them on tiny inputs, so compile time
  dominates: LLVM's optimisation level 0 halves it (XLA's HLO passes, and so numerics and
  buffer assignment, are unchanged), and XLA:CPU's older elemental emitters instead of its
  MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``) take it down ~2.5x more
  (the same HLO after the same passes, lowered by other code: outputs differ from the
  default's by a few float32 ulps, ~1e-6 at most on unit-scale attention, and compiled
  memory by a few hundred bytes in tens of MiB). ``XLA_FLAGS`` here are set before JAX
  initialises its backend, and every program a test starts inherits them.
* float32 matmuls at full precision, so tolerances mean the same on every backend.
* One persistent JAX compilation cache for the whole session (``compilation_cache``):
  the pytest processes (both xdist workers) and every program they start
  (``python -m effx.train``, benchmark workers) load an executable any of them compiled
  before instead of compiling it again. The cache key is the program, the compile
  options and the XLA flags, so a process loads only what it would have compiled itself:
  results are unchanged. The folder is new each session and removed at its end.
"""

import os
import pathlib
import shutil
import sys

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in FAST_COMPILE:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The session's compilation cache: its folder is made by the process that runs the
# session (xdist's controller, or pytest alone) and handed to the workers (and from any
# of them to their subprocesses) in the environment. Every compile is cached (no minimum
# compile time). No size limit: jax's size limit would rescan the whole folder at every
# write (and take a file lock around it); without it a reader that meets an entry being
# written gets an error it reports as a warning, and compiles.
_CACHE_FOLDER = "EFFX_TESTS_COMPILATION_CACHE"
_CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": "-1"}


def compilation_cache() -> dict[str, str]:
  """The environment variables of the session's compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": os.environ[_CACHE_FOLDER], **_CACHE_SETTINGS}


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin has set up the base folder
def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # the session's own process makes the folder
    folder = config._tmp_path_factory.getbasetemp() / "jax_compilation_cache"  # noqa: SLF001
    folder.mkdir(exist_ok=True)
    os.environ[_CACHE_FOLDER] = str(folder)
    config.stash[_CACHE_KEY] = folder
  for name, value in compilation_cache().items():
    os.environ[name] = value
    jax.config.update(name.lower(), int(value) if name.endswith(("SIZE", "BYTES"))
                      else float(value) if name.endswith("SECS") else value)


def pytest_unconfigure(config):
  folder = config.stash.get(_CACHE_KEY, None)
  if folder is not None:
    shutil.rmtree(folder, ignore_errors=True)


_CACHE_KEY = pytest.StashKey[pathlib.Path]()

# tests/support.py holds helpers for every test directory.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
  """A tiny random BERT checkpoint folder in Hugging Face's format (``tiny_bert.py``)."""
  from tiny_bert import write_folder  # noqa: PLC0415

  return write_folder(tmp_path_factory.mktemp("tiny_bert"))


# The families a test run over every family keeps in the fast tier (-m "not slow"): the
# reference, a static and a per-example layout on the block-sparse kernel, and a kernel
# feature map; the full suite runs them all.
FAST_FAMILIES = ("dense", "local", "bigbird", "performer")


def pytest_collection_modifyitems(config, items):
  """Tests marked ``gpu`` run only where JAX has a GPU; a case of a test parametrized
  over attention families (a ``name`` or ``attention`` argument) is ``slow`` unless its
  family is one of ``FAST_FAMILIES``, and runs on the worker that runs its module's other
  cases of that family; slow tests run first."""
  del config
  import effx.attention as ea  # noqa: PLC0415 (after the XLA flags above)

  slow = pytest.mark.slow
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = params.get("name", params.get("attention"))
    if family not in ea.names():
      continue
    if family not in FAST_FAMILIES:
      item.add_marker(slow)
    # A module builds a family's programs once (its lru_caches): pytest-xdist hands a
    # group to one worker (--dist loadgroup, pyproject.toml), so the other does not
    # trace and compile them again.
    item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}:{family}"))
  # The long tests first: pytest-xdist hands out tests in this order, so the last minute
  # is not one worker finishing a sweep while the other waits.
  items.sort(key=lambda item: "slow" not in item.keywords)
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() is not 'gpu')")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
