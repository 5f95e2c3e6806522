"""A trained model's forward as ONNX, run by ONNX Runtime (ORT), in float or int8.

``convert(forward, inputs)`` traces ``forward`` once with JAX (a symbolic batch allowed)
and hands jax2onnx a replay of that trace rewritten for ONNX and ORT:

* flax's layer scan meets jax2onnx's own ``jnp.shape`` while tracing; tracing with JAX
  first and replaying the jaxpr avoids it;
* nested calls (``pjit``, remat, custom derivatives) are inlined, so every rewrite below
  reaches the whole program;
* a scan over constants (the layer stack's stacked parameters) is unrolled: each layer's
  weights become their own initializers, which ORT's quantizers need (a ``Loop`` slicing
  a stacked tensor quantizes nothing); other scans are kept, their bodies rewritten;
* operations on constants only are evaluated once, here (performer's random features,
  position tables, dequantized int8 weights), unless the result would be much larger
  than what it is made from (a broadcast mask stays an operation, not a tensor on disk);
* products (``dot_general``) become ``MatMul``: dense layers' ``x @ W`` with ``W``
  reshaped to 2D (constant, so folded), attention's batched products with their batch
  axes moved first; jax2onnx writes most of them as ``Einsum``, which ORT neither fuses
  nor quantizes, and runs slowly on CPU;
* moving booleans (select, gather, slices) are made on uint8 (ORT has no boolean
  ``Where`` kernel, which jax2onnx writes for them);
* float-to-integer conversions saturate, as XLA's do (ONNX leaves them undefined out
  of range);
* total-order float comparisons (``searchsorted``) compare the floats' bit patterns as
  integers, ordered the same way (ONNX has no total-order comparison);
* after conversion, a large constant that repeats along some axes (a broadcast mask or
  position table) is stored once and expanded by the graph.

The math is unchanged: every rewrite computes the same values as the traced program.

``quantize(src, dst, mode, calibration)``: ORT's ``quantize_dynamic`` (int8 weights,
activations quantized at run time) or ``quantize_static`` (QDQ, activation ranges
calibrated on examples). ``session(path, threads)``: an ORT session with every graph
optimisation on.

jax2onnx is installed without its declared dependencies (every release from 0.13.1
declares ``orbax-checkpoint<0.11.37``, older than effx's; it imports none of it):
``pip install 'effx[onnx]' && pip install --no-deps -r requirements-models.txt``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import jax
from jax.extend import core as jcore
import jax.numpy as jnp
import numpy as np

# Inline these: their sub-program is the whole computation (nothing of theirs is kept).
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Moving booleans: made on uint8 (ORT has no boolean Where, which jax2onnx writes for
# these; a select's own predicate stays boolean).
_ON_BYTES = {"select_n", "gather", "dynamic_slice", "dynamic_update_slice", "scatter",
             "pad"}
# A folded constant may be this much larger than its inputs (bytes) before the
# operation is kept instead (1 MiB below that is always folded).
_FOLD_GROWTH = 4
_FOLD_ALWAYS = 1 << 20


def install_hint() -> str:
  return ("ONNX export needs onnx, onnxruntime and jax2onnx: pip install 'effx[onnx]' && "
          "pip install --no-deps -r requirements-models.txt")


OPSET = 21


def version() -> str:
  """ONNX Runtime's version."""
  import onnxruntime  # noqa: PLC0415

  return onnxruntime.__version__


def available() -> bool:
  """Whether jax2onnx, onnx and onnxruntime import."""
  try:
    import jax2onnx  # noqa: F401, PLC0415
    import onnx  # noqa: F401, PLC0415
    import onnxruntime  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def _is_known(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _static(aval) -> bool:
  return all(isinstance(d, int) for d in getattr(aval, "shape", ()))


def _aval_bytes(aval) -> int:
  try:
    return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
  except TypeError:  # key arrays: a few words each
    return 8 * int(np.prod(aval.shape))


def _eval(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Replays ``jaxpr`` on ``args`` (tracers or constants) with the module's rewrites."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outvals = _equation(eqn, invals)
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, x in zip(eqn.outvars, outvals):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _closed(jaxpr) -> tuple[jcore.Jaxpr, Sequence[Any]]:
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def _bind(eqn, invals):
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _equation(eqn, invals):
  name = eqn.primitive.name
  if name in _CALLS and _CALLS[name] in eqn.params:
    inner, consts = _closed(eqn.params[_CALLS[name]])
    # custom_vjp_call's operands may lead with the residual consts it closes over.
    return _eval(inner, consts, invals[len(invals) - len(inner.invars):])
  if name == "scan":
    return _scan(eqn, invals)
  if name == "cond":
    index, *operands = invals
    branches = [functools.partial(_run_closed, b) for b in eqn.params["branches"]]
    if _is_known(index):
      return branches[int(index)](*operands)
    return jax.lax.switch(index, branches, *operands)
  if (name != "dim_as_value"  # a symbolic size as a value: known when the graph runs
      and all(_is_known(x) for x in invals) and all(_static(v.aval) for v in eqn.outvars)):
    return _fold(eqn, invals)
  if name == "dot_general":
    product = _matmul(eqn, invals)
    if product is not None:
      return product
  if name in ("lt_to", "le_to"):  # on integers, total order is the usual one
    x, y = invals
    if jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
      x, y = _total_order_key(x), _total_order_key(y)
    return x < y if name == "lt_to" else x <= y
  if (name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.integer)
      and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)):
    # XLA saturates a float's conversion to an integer (NaN to 0); ONNX's Cast leaves
    # out-of-range values undefined (ORT wraps: 128.0 becomes -128 as int8).
    info = jnp.iinfo(eqn.params["new_dtype"])
    x = invals[0]
    x = jnp.where(jnp.isnan(x), 0, jnp.clip(x, float(info.min), float(info.max)))
    return _bind(eqn, [x])
  if name in _ON_BYTES and eqn.outvars[0].aval.dtype == jnp.bool_:
    as_bytes = [jnp.asarray(x).astype(jnp.uint8) if jnp.asarray(x).dtype == jnp.bool_
                and (name != "select_n" or i > 0) else x for i, x in enumerate(invals)]
    return _bind(eqn, as_bytes).astype(jnp.bool_)
  return _bind(eqn, invals)


def _total_order_key(x):
  """Integers ordered as IEEE's total order of the floats ``x`` (what searchsorted
  compares with; ONNX has no such comparison): negative floats' magnitude bits flipped."""
  x = jnp.asarray(x)
  bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
  i = jax.lax.bitcast_convert_type(x, bits)
  magnitude = jnp.asarray(np.iinfo(bits).max, bits)
  return i ^ (jax.lax.shift_right_arithmetic(i, jnp.asarray(8 * x.dtype.itemsize - 1,
                                                          bits)) & magnitude)


def _run_closed(closed, *args):
  jaxpr, consts = _closed(closed)
  return _eval(jaxpr, consts, args)


def _fold(eqn, invals):
  """Evaluates an operation on constants now, unless its result is much larger than its
  inputs (then it stays an operation on those constants)."""
  size = sum(_aval_bytes(v.aval) for v in eqn.outvars)
  inputs = sum(_aval_bytes(jax.typeof(x)) for x in invals)
  if size > max(_FOLD_ALWAYS, _FOLD_GROWTH * inputs):
    return _bind(eqn, invals)
  with jax.ensure_compile_time_eval():
    return _bind(eqn, invals)


def _matmul(eqn, invals):
  """A ``dot_general`` as numpy's ``matmul`` (ONNX ``MatMul``) where it is one: operands
  transposed to ``[batch.., free, contracted]`` / ``[batch.., contracted, free]``; without
  batch axes ``x``'s free axes stay leading (matmul broadcasts them) and the contracted
  and ``W``'s free axes are merged. None when axes next to a symbolic one would have to
  be merged (or ``x`` is a constant and ``W`` is not)."""
  x, w = invals
  (cx, cw), (bx, bw) = eqn.params["dimension_numbers"]
  # Static shapes: not jnp.shape, which jax2onnx replaces with traced sizes.
  sx, sw = tuple(np.shape(x)), tuple(np.shape(w))
  fx = [a for a in range(len(sx)) if a not in cx and a not in bx]
  fw = [a for a in range(len(sw)) if a not in cw and a not in bw]
  if _is_known(x) and not _is_known(w):
    return None
  if not all(isinstance(sx[a], int) for a in cx) or not all(
      isinstance(sw[a], int) for a in fw):
    return None
  dtype = eqn.outvars[0].aval.dtype
  x, w = jnp.asarray(x).astype(dtype), jnp.asarray(w).astype(dtype)
  if bx:  # batched (attention's products): one free and one contracted axis each
    if len(fx) != 1 or len(fw) != 1 or len(cx) != 1:
      return None
    return jnp.matmul(_transposed(x, (*bx, *fx, *cx)), _transposed(w, (*bw, *cw, *fw)))
  k = int(np.prod([sx[a] for a in cx]))
  n = int(np.prod([sw[a] for a in fw]))
  x = _transposed(x, (*fx, *cx))
  if len(cx) != 1:
    x = jnp.reshape(x, (*x.shape[:len(fx)], k))
  with jax.ensure_compile_time_eval() if _is_known(w) else contextlib.nullcontext():
    w = jnp.reshape(_transposed(w, (*cw, *fw)), (k, n))
  out = jnp.matmul(x, w)
  return out if len(fw) == 1 else jnp.reshape(out, (*out.shape[:-1], *(sw[a] for a in fw)))


def _transposed(x, perm):
  return x if tuple(perm) == tuple(range(len(perm))) else jnp.transpose(x, perm)


def _scan(eqn, invals):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  body = functools.partial(_run_closed, p["jaxpr"])
  if xs and all(_is_known(x) for x in xs):
    # Unrolled: the slices of constants (each layer's weights) are constants themselves.
    ys = []
    steps = range(p["length"])
    for i in reversed(steps) if p["reverse"] else steps:
      with jax.ensure_compile_time_eval():
        x = [x[i] for x in xs]
      out = body(*consts, *carry, *x)
      carry, y = out[:ncarry], out[ncarry:]
      ys.append(y)
    if p["reverse"]:
      ys.reverse()
    stacked = [jnp.stack(column) for column in zip(*ys)] if ys and ys[0] else []
    if not ys:  # length 0: the scan's empty outputs
      stacked = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[ncarry:]]
    return [*carry, *stacked]

  def step(c, x):
    out = body(*consts, *c, *x)
    return list(out[:ncarry]), list(out[ncarry:])

  carry, ys = jax.lax.scan(step, list(carry), list(xs), length=p["length"],
                           reverse=p["reverse"])
  return [*carry, *ys]


def prepare(forward: Callable, inputs: Sequence[jax.ShapeDtypeStruct]) -> Callable:
  """``forward`` traced once at ``inputs`` (symbolic dimensions allowed) and returned as
  a function replaying that trace with the rewrites above: same outputs, an ONNX-ready
  program. Also useful to check a rewrite in JAX: ``prepare(f, specs)(*args) == f(*args)``.
  """
  closed = jax.make_jaxpr(forward)(*inputs)

  def replay(*args):
    out = _eval(closed.jaxpr, closed.consts, args)
    return out[0] if len(out) == 1 else tuple(out)

  return replay


@contextlib.contextmanager
def _quiet():
  """jax2onnx and ORT's quantizers log each step at INFO (to the root logger, which absl
  shows): keep the command's output readable."""
  loggers = [logging.getLogger(n) for n in ("", "jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  try:
    import onnxruntime  # noqa: PLC0415

    # The sessions ORT's quantizers open log each unused initializer as a warning.
    onnxruntime.set_default_logger_severity(3)
  except ImportError:
    pass
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def convert(forward: Callable, inputs: Sequence[jax.ShapeDtypeStruct],
            names: Sequence[str], output_names: Sequence[str], opset: int = OPSET):
  """``onnx.ModelProto`` of ``forward`` at ``inputs`` (a symbolic batch becomes the
  ONNX dimension ``batch``; a symbolic length ``length``)."""
  try:
    from jax2onnx import to_onnx  # noqa: PLC0415
  except ImportError:
    raise ImportError(install_hint()) from None
  replay = prepare(forward, inputs)
  with _quiet():
    model = to_onnx(replay, list(inputs), model_name="effx", opset=opset,
                    input_names=list(names), output_names=list(output_names))
  _compact_constants(model)
  for value in list(model.graph.input) + list(model.graph.output):
    for dim in value.type.tensor_type.shape.dim:
      if dim.dim_param:
        dim.dim_param = {"b": "batch", "n": "length"}.get(dim.dim_param, dim.dim_param)
  return model


def _compact_constants(model, min_bytes: int = 1 << 16) -> None:
  """Rewrites, in place, each initializer of at least ``min_bytes`` that repeats along
  some axes (jax2onnx writes a broadcast of a constant as the full tensor: a mask or a
  position table times the batch) as its distinct part and an ``Expand`` to the full
  shape: the same values, a fraction of the file."""
  import onnx  # noqa: PLC0415
  from onnx import numpy_helper  # noqa: PLC0415

  graph = model.graph
  keep, nodes = [], []
  for init in graph.initializer:
    if init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
      keep.append(init)
      continue
    array = numpy_helper.to_array(init)
    if array.nbytes < min_bytes:
      keep.append(init)
      continue
    small = array
    for axis in range(array.ndim):
      first = np.take(small, [0], axis=axis)
      if small.shape[axis] > 1 and np.array_equal(small, np.broadcast_to(first, small.shape)):
        small = first
    if small.size * 4 > array.size:
      keep.append(init)
      continue
    part = numpy_helper.from_array(np.ascontiguousarray(small), init.name + "__part")
    shape = numpy_helper.from_array(np.asarray(array.shape, np.int64), init.name + "__shape")
    keep += [part, shape]
    nodes.append(onnx.helper.make_node("Expand", [part.name, shape.name], [init.name],
                                       name=init.name + "__expand"))
  if nodes:
    del graph.initializer[:]
    graph.initializer.extend(keep)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)


def session(path: str, threads: int = 0):
  """An ORT CPU session on ``path`` with every graph optimisation on; ``threads``: intra-op
  threads (0: ORT's default, all cores)."""
  import onnxruntime as ort  # noqa: PLC0415

  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.log_severity_level = 3  # errors only: unused-initializer warnings are noise
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def quantize(src: str, dst: str, mode: str,
             calibration: Iterable[dict[str, np.ndarray]] | None = None) -> None:
  """Writes ``src`` quantized to int8 at ``dst``.

  ``mode="dynamic"``: ORT's ``quantize_dynamic`` (int8 weights, uint8 activations
  quantized per call). ``mode="static"``: ``quantize_static`` in QDQ format with
  activation ranges calibrated (min/max) on ``calibration``'s feeds (dicts of input name
  -> array). Both quantize the products with a constant operand only (the layers' weights;
  attention's products of two activations stay float) and embedding tables (``Gather``),
  weights with one scale per output channel (per tensor, MiniLM's embeddings kept a cosine
  of 0.96 to the float model's; per channel 0.99), and preprocess with ORT's optimiser
  first, as its docs advise.
  """
  from onnxruntime import quantization as q  # noqa: PLC0415

  staged = dst + ".pre.onnx"
  try:
    # ORT's symbolic shape inference fails on jax2onnx's graphs (a value without a
    # type); ONNX's own shape inference and ORT's graph optimisation still run.
    with _quiet():
      q.quant_pre_process(src, staged, skip_symbolic_shape=True)
  except Exception as error:  # noqa: BLE001 (an optimisation: the plain graph quantizes)
    logging.warning("ORT's quantization preprocessing failed (%s); quantizing the graph "
                    "as exported", str(error).splitlines()[0] if str(error) else error)
    staged = src
  try:
    with _quiet():
      if mode == "dynamic":
        q.quantize_dynamic(staged, dst, weight_type=q.QuantType.QInt8, per_channel=True,
                           op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                           extra_options={"MatMulConstBOnly": True})
      elif mode == "static":
        feeds = list(calibration or [])
        if not feeds:
          raise ValueError("static int8 needs calibration examples")

        class Reader(q.CalibrationDataReader):
          def __init__(self):
            self._feeds = iter(feeds)

          def get_next(self):
            return next(self._feeds, None)

        # Not Gemm (a 2D layer with its bias, as ORT's preprocessing fuses it): ORT 1.32's
        # per-channel bias check fails on the [1, N] bias jax2onnx writes.
        q.quantize_static(staged, dst, Reader(), quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          per_channel=True, op_types_to_quantize=["MatMul", "Gather"],
                          calibrate_method=q.CalibrationMethod.MinMax,
                          extra_options={"MatMulConstBOnly": True})
      else:
        raise ValueError(f"--int8={mode!r}: one of none, dynamic, static")
    # ORT's optimiser folded the expanded constants back into full tensors.
    import onnx  # noqa: PLC0415

    model = onnx.load(dst)
    _compact_constants(model)
    onnx.save(model, dst)
  finally:
    if staged != src and os.path.exists(staged):
      os.remove(staged)
