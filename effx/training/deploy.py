"""A trained model as a deployable artifact: serialized StableHLO (``jax.export``) or
ONNX (jax2onnx, for ONNX Runtime, in float or int8).

``export_workdir(workdir, out, format=...)`` restores one checkpoint of an ``effx.train``
workdir (classifier, retrieval dual encoder, sentence encoder, causal LM; float, QAT or
an integer export) and writes ``out/``:

* ``model.stablehlo``: the inference forward (``train=False``, deterministic) with the
  parameters inside, serialized by ``jax.export``. Any JAX process calls it without
  effx or flax::

    exported = jax.export.deserialize(open("out/model.stablehlo", "rb").read())
    logits = exported.call(ids)            # int32 [batch, length], 0 = padding

  The batch is symbolic by default (one artifact serves any batch size); the length is
  the model's (``--length=dynamic``: any length up to it, for the families whose
  compute does not depend on it statically).
* or ``model.onnx`` (``format="onnx"``): the same forward as an ONNX graph with the
  parameters as initializers (``effx.training.deploy_onnx``), checked in ONNX Runtime
  against effx's forward before it is written; ``int8="dynamic"`` / ``"static"``
  quantizes its products with ORT's tools (static: calibrated on training examples)::

    session = onnxruntime.InferenceSession("out/model.onnx")
    logits = session.run(None, {"inputs": ids})[0]

* ``manifest.json``: inputs and outputs (names, shapes, dtypes), the model kind and
  attention family, the checkpoint step, hashes of the config and parameters, the
  versions that made it, and (ONNX) the check against effx's forward.
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

FORMATS = ("stablehlo", "onnx")
ARTIFACTS = {"stablehlo": "model.stablehlo", "onnx": "model.onnx"}
INT8 = ("none", "dynamic", "static")
MANIFEST = "manifest.json"
# A float ONNX graph must give effx's outputs to this (relative to their largest value).
ONNX_TOLERANCE = 1e-4
# ... and a QAT or integer-export model's (quant.mode "qat" / "int"): its activations are
# rounded to integers in the graph, and where XLA's and ORT's divisions differ in the last
# bit a value at a rounding boundary lands one step apart (measured: 3e-3 on ListOps).
ONNX_QUANTIZED_TOLERANCE = 1e-2


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


def _input_specs(max_len: int, dual: bool, batch, length):
  """The ids' ShapeDtypeStructs: a symbolic ``b`` / ``n <= max_len`` where dynamic."""
  if length == "dynamic":
    b, n = jax.export.symbolic_shape(f"{'b' if batch == 'dynamic' else batch}, n",
                                     constraints=[f"n <= {max_len}"])
  else:
    b = jax.export.symbolic_shape("b")[0] if batch == "dynamic" else batch
    n = length
  return [jax.ShapeDtypeStruct((b, n), jnp.int32)] * (2 if dual else 1)


def _refusal(family: str, fmt: str, batch, length, error: Exception) -> ValueError:
  what = ("a dynamic length" if length == "dynamic" else "a dynamic batch"
          if batch == "dynamic" else "this shape")
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return ValueError(f"{family} cannot export {what} to {fmt}: {first}"
                    + ("; give --length=N" if length == "dynamic" else
                       "; give --batch=N" if batch == "dynamic" else ""))


def _forward(model, variables):
  def forward(*ids):
    outputs, _ = model.apply(variables, *ids, train=False)
    return outputs
  return forward


def export_model(model, variables, *, max_len: int, dual: bool = False,
                 batch: str | int = "dynamic", length: str | int | None = None,
                 platforms: tuple[str, ...] = ("cpu",), family: str = "this family"):
  """``jax.export.Exported`` of ``model``'s inference forward with ``variables`` inside:
  ``(ids[, ids2]) -> outputs``, ids int32 ``[batch, length]`` (0 = padding).

  ``batch``: an int or ``"dynamic"`` (symbolic ``b``); ``length``: an int, None (=
  ``max_len``) or ``"dynamic"`` (symbolic ``n <= max_len``). A family whose compute
  needs a static size raises ValueError naming it."""
  length = max_len if length is None else length
  inputs = _input_specs(max_len, dual, batch, length)
  try:
    return jax.export.export(jax.jit(_forward(model, variables)),
                             platforms=platforms)(*inputs)
  except (jax.errors.InconclusiveDimensionOperation, ValueError, TypeError) as error:
    raise _refusal(family, "StableHLO", batch, length, error) from None


def export_onnx(model, variables, *, max_len: int, dual: bool = False,
                batch: str | int = "dynamic", length: str | int | None = None,
                family: str = "this family", output: str = "logits"):
  """``onnx.ModelProto`` of ``model``'s inference forward (float32), inputs ``inputs``
  [and ``inputs2``] int32 ``[batch, length]``; ``batch`` / ``length`` as in
  ``export_model`` (dimensions named ``batch`` / ``length`` in the graph). Raises
  ValueError naming the family when the converter or ONNX cannot express it."""
  from effx.training import deploy_onnx  # noqa: PLC0415 (optional dependencies)

  length = max_len if length is None else length
  inputs = _input_specs(max_len, dual, batch, length)
  names = ["inputs", "inputs2"][:len(inputs)]
  try:
    return deploy_onnx.convert(_forward(model, variables), inputs, names, [output])
  except ImportError:
    raise
  except Exception as error:  # noqa: BLE001 (the converter raises many kinds)
    raise _refusal(family, "ONNX", batch, length, error) from None


def export_workdir(workdir: str, out: str, *, format: str = "stablehlo",  # noqa: A002
                   checkpoint: str = "best", batch: str | int | None = "dynamic",
                   length: str | int | None = None, platforms: tuple[str, ...] = ("cpu",),
                   int8: str = "none", calibration_examples: int = 256,
                   overwrite: bool = False) -> dict:
  """Writes ``workdir``'s model (one checkpoint) to ``out`` as an artifact of ``format``;
  returns the manifest.

  Args:
    workdir: an ``effx.train`` workdir (or an integer export of one).
    out: the artifact's folder; must not exist unless ``overwrite``.
    format: ``"stablehlo"`` or ``"onnx"``.
    checkpoint: ``"best"`` (on validation), ``"latest"`` or a step.
    batch: a fixed batch size, or ``"dynamic"`` (symbolic).
    length: a fixed length (at most the model's), ``"dynamic"`` (symbolic, up to the
      model's), or None: the model's.
    platforms: what a StableHLO artifact is lowered for (``"cpu"``, ``"cuda"``,
      ``"tpu"``); ONNX: ``("cpu",)`` (ONNX Runtime's CPU provider is what is checked).
    int8: ONNX only: ``"none"`` (float32), ``"dynamic"`` (ORT ``quantize_dynamic``) or
      ``"static"`` (ORT ``quantize_static``, QDQ, calibrated on the first
      ``calibration_examples`` training examples).
    overwrite: replace an existing ``out`` (only once the new artifact is complete).
  """
  if format not in FORMATS:
    raise ValueError(f"--format={format!r}: one of {', '.join(FORMATS)}")
  if int8 not in INT8:
    raise ValueError(f"--int8={int8!r}: one of {', '.join(INT8)}")
  if int8 != "none" and format != "onnx":
    raise ValueError(f"--int8={int8} needs --format=onnx (StableHLO keeps the model's own "
                     "precision; quantize in effx with effx.quantize)")
  if int8 == "static" and calibration_examples <= 0:
    raise ValueError(f"--calibration_examples={calibration_examples}: static int8 needs at "
                     "least one example")
  if format == "onnx" and tuple(platforms) != ("cpu",):
    raise ValueError(f"--platforms={','.join(platforms)}: an ONNX artifact is made for "
                     "ONNX Runtime's CPU provider (leave --platforms at cpu)")
  if format == "onnx":
    from effx.training import deploy_onnx  # noqa: PLC0415 (optional dependencies)

    if not deploy_onnx.available():
      raise ImportError(deploy_onnx.install_hint())
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
  output = {"encoder": "embeddings", "causal_lm": "logits"}.get(kind, "logits")
  names = ["inputs", "inputs2"][:2 if run.task.dual else 1]
  with run.context():
    if format == "stablehlo":
      exported = export_model(run.model, variables, max_len=max_len, dual=run.task.dual,
                              batch=batch, length=length, platforms=platforms,
                              family=family)
      shape = [str(d) for d in exported.in_avals[0].shape]
      outputs = [{"name": output, "dtype": str(a.dtype), "shape": [str(d) for d in a.shape]}
                 for a in exported.out_avals]
      payload, call = exported.serialize(), ("jax.export.deserialize(bytes).call("
                                             + ", ".join(names) + ")")
    else:
      proto = export_onnx(run.model, variables, max_len=max_len, dual=run.task.dual,
                          batch=batch, length=length, family=family, output=output)
      shape = _onnx_shape(proto.graph.input[0])
      outputs = [{"name": output, "dtype": "float32", "shape": _onnx_shape(proto.graph.output[0])}]
      payload, call = proto.SerializeToString(), (
          "onnxruntime.InferenceSession(path).run(None, {"
          + ", ".join(f"'{n}': {n}" for n in names) + "})")
  manifest = {
      "format": format, "file": ARTIFACTS[format], "call": call,
      "kind": kind, "attention": family,
      "inputs": [{"name": name, "dtype": "int32", "shape": shape, "padding_id": 0}
                 for name in names],
      "outputs": outputs,
      "platforms": list(platforms), "checkpoint": checkpoint, "step": int(step),
      "workdir": os.path.abspath(workdir),
      "config_sha256": hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16],
      "params_sha256": _hash(variables),
      "effx": metadata.version("effx"), "jax": jax.__version__,
      "config": json.loads(config.to_json_best_effort()),
  }

  def write(staging: str) -> None:
    path = os.path.join(staging, ARTIFACTS[format])
    if format == "onnx":
      manifest.update(_finish_onnx(payload, path, run, variables, names, batch, length,
                                   int8, calibration_examples))
    else:
      with open(path, "wb") as f:
        f.write(payload)
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

  _staged(out, write)
  return manifest


def _onnx_shape(value) -> list[str]:
  return [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]


def _check_ids(batch, length, max_len: int, vocab_size: int, count: int, seed: int = 0):
  """Token ids to compare an artifact with effx on: random tokens with a padded tail."""
  b = 3 if batch == "dynamic" else batch
  n = max_len if length == "dynamic" else length
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, max(2, vocab_size), size=(count, b, n)).astype(np.int32)
  ids[:, 0, n // 2:] = 0
  return list(ids)


def _finish_onnx(payload: bytes, path: str, run, variables, names, batch, length,
                 int8: str, calibration_examples: int) -> dict:
  """Writes the ONNX artifact at ``path`` (quantized if asked), having checked the float
  graph in ONNX Runtime against effx's forward; returns the manifest's ONNX fields."""
  from effx.training import deploy_onnx  # noqa: PLC0415

  staged = path + ".float.onnx" if int8 != "none" else path
  with open(staged, "wb") as f:
    f.write(payload)
  ids = _check_ids(batch, length, run.task.max_len, run.task.vocab_size, len(names))
  feeds = dict(zip(names, ids))
  with run.context():
    expected = np.asarray(jax.jit(_forward(run.model, variables))(*ids))
  scale = float(np.max(np.abs(expected))) + 1e-6
  got = deploy_onnx.session(staged).run(None, feeds)[0]
  float_error = float(np.max(np.abs(got - expected))) / scale
  tolerance = (ONNX_TOLERANCE if run.config.quant.mode == "none"
               else ONNX_QUANTIZED_TOLERANCE)
  if not float_error <= tolerance:
    raise ValueError(f"the ONNX graph of {run.config.model.attention} differs from effx's "
                     f"forward by {float_error:.2e} (relative; tolerance {tolerance:g}): "
                     "not written")
  fields = {"int8": int8, "opset": deploy_onnx.OPSET, "onnxruntime": deploy_onnx.version(),
            "check": {"batch": int(ids[0].shape[0]), "length": int(ids[0].shape[1]),
                      "float_max_relative_error": float_error, "tolerance": tolerance}}
  if int8 != "none":
    calibration = None
    if int8 == "static":
      calibration = list(_calibration_feeds(run, names, batch, length,
                                            calibration_examples))
      fields["calibration_examples"] = sum(len(f[names[0]]) for f in calibration)
    deploy_onnx.quantize(staged, path, int8, calibration)
    os.remove(staged)
    got = deploy_onnx.session(path).run(None, feeds)[0]
    fields["check"]["int8_max_relative_error"] = float(np.max(np.abs(got - expected))) / scale
  return fields


def _calibration_feeds(run, names, batch, length, count: int):
  """The first ``count`` training examples as ORT feeds, in batches of the artifact's
  batch size (32 when dynamic), cut to its length."""
  from effx import data as data_lib  # noqa: PLC0415 (loads the task: static int8 only)
  from effx.data import pipeline  # noqa: PLC0415

  task = data_lib.load(run.config.data, run.config.seed)
  size = 32 if batch == "dynamic" else batch
  n = task.max_len if length == "dynamic" else length
  keys = ["inputs", "inputs2"][:len(names)]
  seen = 0
  for examples in pipeline.eval_batches(task.splits["train"], size, max_examples=count):
    real = int(np.sum(examples["weights"] > 0))
    if real == 0:
      break
    rows = real if batch == "dynamic" else size  # a fixed batch keeps its padding rows
    yield {name: np.asarray(examples[k][:rows, :n], np.int32) for name, k in zip(names, keys)}
    seen += real
    if seen >= count:
      break


def _staged(out: str, write) -> None:
  """Runs ``write(folder)`` in a staging folder beside ``out``, then renames it to ``out``
  (an existing ``out`` is replaced only once the new one is whole)."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # a folder as os.makedirs would make it
  try:
    write(staging)
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
