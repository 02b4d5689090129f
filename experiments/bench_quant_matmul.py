"""Quantized projection matmuls: lacax `PackedWeight` against Qwix `QArray` (when importable), on CPU.

For SmolLM2-135M's MLP shapes (576 x 1536 and 1536 x 576), decode (1 token) and prefill (128 tokens): time per
jitted einsum, resident weight bytes, and the max error of the dequantized weight against float32, for int8
per-channel and int4 with groups of 32. "lacax" is `PackedWeight.project` as the forward runs it (the XLA:CPU
low-bit kernel where it applies: decode), "dequant" the XLA path it replaces (dequantize, then the dot).
Writes JSON under results/bench_quant_matmul/ and prints a table.

    python -m experiments.bench_quant_matmul            # lacax only
    /path/to/venv-with-qwix/bin/python -m experiments.bench_quant_matmul   # adds the qwix rows
"""

from __future__ import annotations

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from lacax import results
from lacax.model import cpu_quant_matmul
from lacax.model.quantized import PackedWeight

flags.DEFINE_integer("repeats", 50, "timed calls per case")
flags.DEFINE_string("out", "results/bench_quant_matmul", "output directory")
FLAGS = flags.FLAGS


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def _nbytes(tree) -> int:
  total = 0
  for a in jax.tree.leaves(tree):
    bits = jnp.iinfo(a.dtype).bits if jnp.issubdtype(a.dtype, jnp.integer) else a.dtype.itemsize * 8
    total += int(np.prod(a.shape)) * bits // 8
  return total


def main(argv):
  del argv
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError:
    qwix = None
  rng = np.random.default_rng(0)
  rows = []
  for k, n in ((576, 1536), (1536, 576)):
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.02, jnp.float32)
    for tokens in (1, 128):
      x = jnp.asarray(rng.normal(size=(1, tokens, k)), jnp.float32)
      dense_t = _time(jax.jit(lambda x, w: jnp.einsum("btk,kn->btn", x, w)), x, w, repeats=FLAGS.repeats)
      rows.append({"impl": "float32", "bits": 32, "group": None, "shape": [k, n], "tokens": tokens,
                   "seconds": dense_t, "bytes": int(w.size * 4), "max_err": 0.0})
      for bits, group in ((8, None), (4, 32)):
        pw = PackedWeight.quantize(w[None], 1, bits, group)
        pw = jax.tree.map(lambda a: a[0], pw)
        t = _time(jax.jit(lambda x, p: p.project(x, "btk,kn->btn")), x, pw, repeats=FLAGS.repeats)
        err = float(jnp.abs(pw.dense() - w).max())
        rows.append({"impl": "lacax", "bits": bits, "group": group, "shape": [k, n], "tokens": tokens,
                     "seconds": t, "bytes": pw.nbytes, "max_err": err,
                     "cpu_kernel": cpu_quant_matmul.supports(pw, x, "btk,kn->btn") and cpu_quant_matmul.available()})
        # The XLA path the kernel replaces in decode: the whole weight dequantized, then the dot.
        xla_path = jax.jit(lambda x, p: p._xla_project(x, "btk,kn->btn"))  # pylint: disable=protected-access
        td = _time(xla_path, x, pw, repeats=FLAGS.repeats)
        rows.append({"impl": "dequant", "bits": bits, "group": group, "shape": [k, n], "tokens": tokens,
                     "seconds": td, "bytes": pw.nbytes, "max_err": err})
        if qwix is not None:
          qtype = jnp.int8 if bits == 8 else jnp.int4
          tiled = {} if group is None else {0: group}
          qa = qwix.quantize(w, qtype, channelwise_axes=(1,), tiled_axes=tiled)
          tq = _time(jax.jit(lambda x, q: qwix.einsum("btk,kn->btn", x, q)), x, qa, repeats=FLAGS.repeats)
          errq = float(jnp.abs(qwix.dequantize(qa) - w).max())
          rows.append({"impl": "qwix", "bits": bits, "group": group, "shape": [k, n], "tokens": tokens,
                       "seconds": tq, "bytes": _nbytes(qa), "max_err": errq})
  out = {"cpu": results.cpu_model(), "jax": jax.__version__, "qwix": getattr(qwix, "__version__", None),
         "rows": rows, **results.provenance()}
  os.makedirs(FLAGS.out, exist_ok=True)
  path = results.timestamped_path(FLAGS.out)
  results.write_json(path, out)
  print(f"{'impl':8} {'bits':>4} {'group':>5} {'shape':>11} {'tok':>4} {'us':>9} {'bytes':>9} {'max_err':>9}")
  for r in rows:
    print(f"{r['impl']:8} {r['bits']:>4} {str(r['group']):>5} {str(tuple(r['shape'])):>11} {r['tokens']:>4} "
          f"{r['seconds'] * 1e6:9.1f} {r['bytes']:9d} {r['max_err']:9.2e}")
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
