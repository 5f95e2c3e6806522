"""A trained model as a deployable artifact: serialized StableHLO (``jax.export``).

``export_workdir(workdir, out)`` restores one checkpoint of an ``effx.train`` workdir
(classifier, retrieval dual encoder, sentence encoder, causal LM; float, QAT or an
integer export) and writes ``out/``:

* ``model.stablehlo``: the inference forward (``train=False``, deterministic) with the
  parameters inside, serialized by ``jax.export``. Any JAX process calls it without
  effx or flax::

    exported = jax.export.deserialize(open("out/model.stablehlo", "rb").read())
    logits = exported.call(ids)            # int32 [batch, length], 0 = padding

  The batch is symbolic by default (one artifact serves any batch size); the length is
  the model's (``--length=dynamic``: any length up to it, for the families whose
  compute does not depend on it statically).
* ``manifest.json``: inputs and outputs (names, shapes, dtypes), the model kind and
  attention family, the checkpoint step, hashes of the config and parameters, and the
  versions that made it.
* ``tokenizer/``: a copy of the tokenizer folder of sentence encoders.

The model's own input contract: token ids, 0 for padding (a retrieval model takes two
such inputs). Outputs: class logits ``[batch, classes]``, sentence embeddings
``[batch, dim]`` or next-token logits ``[batch, length, vocab]`` (decoding stays in
effx).
"""

from __future__ import annotations

import hashlib
from importlib import metadata
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from effx.common import files
from effx.training import restore as restore_lib

FORMATS = ("stablehlo",)
ARTIFACT = "model.stablehlo"
MANIFEST = "manifest.json"


def _dimension(text: str | int | None, name: str, default: int | None):
  """``--batch`` / ``--length`` as an int, "dynamic" or the default."""
  if text is None or text == "":
    return default
  if str(text) == "dynamic":
    return "dynamic"
  if str(text).isdigit() and int(text) > 0:
    return int(text)
  raise ValueError(f"--{name}={text!r}: a positive integer or 'dynamic'")


def _hash(tree) -> str:
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.asarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def export_model(model, variables, *, max_len: int, dual: bool = False,
                 batch: str | int = "dynamic", length: str | int | None = None,
                 platforms: tuple[str, ...] = ("cpu",), family: str = "this family"):
  """``jax.export.Exported`` of ``model``'s inference forward with ``variables`` inside:
  ``(ids[, ids2]) -> outputs``, ids int32 ``[batch, length]`` (0 = padding).

  ``batch``: an int or ``"dynamic"`` (symbolic ``b``); ``length``: an int, None (=
  ``max_len``) or ``"dynamic"`` (symbolic ``n <= max_len``). A family whose compute
  needs a static size raises ValueError naming it."""

  def forward(*ids):
    outputs, _ = model.apply(variables, *ids, train=False)
    return outputs

  length = max_len if length is None else length
  if length == "dynamic":
    b, n = jax.export.symbolic_shape(f"{'b' if batch == 'dynamic' else batch}, n",
                                     constraints=[f"n <= {max_len}"])
  else:
    b = jax.export.symbolic_shape("b")[0] if batch == "dynamic" else batch
    n = length
  inputs = [jax.ShapeDtypeStruct((b, n), jnp.int32)] * (2 if dual else 1)
  try:
    return jax.export.export(jax.jit(forward), platforms=platforms)(*inputs)
  except (jax.errors.InconclusiveDimensionOperation, ValueError, TypeError) as error:
    what = ("a dynamic length" if length == "dynamic" else "a dynamic batch"
            if batch == "dynamic" else "this shape")
    first = str(error).strip().splitlines()[0]
    raise ValueError(f"{family} cannot export {what}: {first}"
                     + ("; give --length=N" if length == "dynamic" else
                        "; give --batch=N" if batch == "dynamic" else "")) from None


def export_workdir(workdir: str, out: str, *, format: str = "stablehlo",  # noqa: A002
                   checkpoint: str = "best", batch: str | int | None = "dynamic",
                   length: str | int | None = None, platforms: tuple[str, ...] = ("cpu",),
                   overwrite: bool = False) -> dict:
  """Writes ``workdir``'s model (one checkpoint) to ``out`` as an artifact of ``format``;
  returns the manifest.

  Args:
    workdir: an ``effx.train`` workdir (or an integer export of one).
    out: the artifact's folder; must not exist unless ``overwrite``.
    format: ``"stablehlo"``.
    checkpoint: ``"best"`` (on validation), ``"latest"`` or a step.
    batch: a fixed batch size, or ``"dynamic"`` (symbolic).
    length: a fixed length (at most the model's), ``"dynamic"`` (symbolic, up to the
      model's), or None: the model's.
    platforms: what the artifact is lowered for (``"cpu"``, ``"cuda"``, ``"tpu"``).
    overwrite: replace an existing ``out`` (only once the new artifact is complete).
  """
  if format not in FORMATS:
    raise ValueError(f"--format={format!r}: one of {', '.join(FORMATS)}")
  if not files.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"--workdir={workdir}: not an effx.train workdir (no "
                            "config.json)")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"--out={out} exists; choose another folder or pass --overwrite")
  checkpoint = str(checkpoint)
  if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
    raise ValueError(f"--checkpoint={checkpoint!r}: use 'latest', 'best' or a step number")
  bad = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
  if bad or not platforms:
    raise ValueError(f"--platforms={','.join(platforms)}: choose from cpu, cuda, rocm, tpu")
  batch = _dimension(batch, "batch", "dynamic")
  length = _dimension(length, "length", None)
  run, params, model_state, step = restore_lib.restore(workdir, checkpoint, sizes_only=True)
  config, kind = run.config, run.model_config.kind
  max_len = run.task.max_len
  length = max_len if length is None else length
  if length != "dynamic" and length > max_len:
    raise ValueError(f"--length={length} exceeds the model's length {max_len}")
  variables = {"params": params, **model_state}
  family = config.model.attention
  with run.context():
    exported = export_model(run.model, variables, max_len=max_len, dual=run.task.dual,
                            batch=batch, length=length, platforms=platforms, family=family)
  b, n = exported.in_avals[0].shape
  names = ["inputs", "inputs2"][:len(exported.in_avals)]
  manifest = {
      "format": format, "file": ARTIFACT, "call": "jax.export.deserialize(bytes).call("
                                                 + ", ".join(names) + ")",
      "kind": kind, "attention": family,
      "inputs": [{"name": name, "dtype": "int32", "shape": [str(d) for d in (b, n)],
                  "padding_id": 0} for name in names],
      "outputs": [{"name": {"encoder": "embeddings", "causal_lm": "logits"}.get(kind,
                                                                           "logits"),
                   "dtype": str(a.dtype), "shape": [str(d) for d in a.shape]}
                  for a in exported.out_avals],
      "platforms": list(platforms), "checkpoint": checkpoint, "step": int(step),
      "workdir": os.path.abspath(workdir),
      "config_sha256": hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16],
      "params_sha256": _hash(variables),
      "effx": metadata.version("effx"), "jax": jax.__version__,
      "config": json.loads(config.to_json_best_effort()),
  }
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # a folder as os.makedirs would make it
  try:
    with open(os.path.join(staging, ARTIFACT), "wb") as f:
      f.write(exported.serialize())
    tokenizer = config.data.get("tokenizer", "")
    if kind == "encoder" and isinstance(tokenizer, str) and os.path.isdir(tokenizer):
      os.makedirs(os.path.join(staging, "tokenizer"))
      for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json"):
        if os.path.exists(os.path.join(tokenizer, name)):
          shutil.copy2(os.path.join(tokenizer, name), os.path.join(staging, "tokenizer"))
      manifest["tokenizer"] = "tokenizer/tokenizer.json"
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(out):  # overwrite: the old artifact goes only once the new is whole
      old = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
      os.rename(out, os.path.join(old, "artifact"))
      os.rename(staging, out)
      shutil.rmtree(old)
    else:
      os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest
