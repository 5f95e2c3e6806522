"""Random-access reads of prepared tensorflow-datasets (array_record; no TensorFlow)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from effx.data.base import DatasetMissingError


def data_source(name: str, split: str, data_dir: str | None, what: str):
  """``tfds.data_source(name, split)`` or one clear ``DatasetMissingError``."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types from deep inside; report one
    where = data_dir or "~/tensorflow_datasets"
    raise DatasetMissingError(
        f"{what} (tfds '{name}', split '{split}') is not prepared in {where}: "
        f"{type(error).__name__}: {str(error).splitlines()[0]}\n"
        f"Prepare it once on a machine with internet (no TensorFlow needed):\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{where}').download_and_prepare(file_format='array_record')\"\n"
        f"then pass --config.data.dir={where} (or copy that folder here).") from None
