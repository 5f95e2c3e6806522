"""Test-wide settings.

* Tests compile many small programs and run them on tiny inputs, so compile time
  dominates: LLVM's optimisation level 0 halves it (XLA's HLO passes, and so numerics and
  buffer assignment, are unchanged). Set before JAX initialises its backend.
* float32 matmuls at full precision, so tolerances mean the same on every backend.
"""

import os
import pathlib
import sys

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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
  family is one of ``FAST_FAMILIES``; slow tests run first."""
  del config
  import effx.attention as ea  # noqa: PLC0415 (after the XLA flags above)

  slow = pytest.mark.slow
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = params.get("name", params.get("attention"))
    if family in ea.names() and family not in FAST_FAMILIES:
      item.add_marker(slow)
  # The long tests first: pytest-xdist hands out tests in this order, so the last minute
  # is not one worker finishing a sweep while the other waits.
  items.sort(key=lambda item: "slow" not in item.keywords)
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() is not 'gpu')")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
