"""README.md's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # the examples as written: 1024 tokens, a 4-layer model, BERT loading
def test_python_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})
