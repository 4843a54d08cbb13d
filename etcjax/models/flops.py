"""Model FLOPs utilisation (MFU): model FLOPs counted from a jaxpr, and device peaks.

  per_image = flops.training_flops_per_image(model, variables, image_size=224)
  mfu = per_image * batch / step_seconds / (flops.peak_tflops(jax.devices()[0]) * 1e12)

Only matrix products (`dot_general`) and convolutions (`conv_general_dilated`) are counted,
at 2 FLOPs per multiply-add: the convention of MFU (PaLM, big_vision, timm's profilers count
the same operations; elementwise work is a few percent of a ViT's or ConvMixer's). Counting
the traced program rather than XLA's compiled cost analysis keeps the figure the same on
every backend: on GPUs the compiled matmuls are library custom calls that the cost analysis
does not count (ViT-B/16 read 1 % MFU that way on an H100), and CPU FFI kernels count nothing
either; count models with their pure-XLA formulation (ConvMixer `depthwise_impl="conv"`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

# Dense bfloat16 peak TFLOP/s per chip (vendor figures); float32 steps are compared to it too.
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10G": 125.0, "V100": 125.0, "T4": 65.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device: jax.Device) -> float | None:
  """`device`'s dense bf16 peak from `PEAK_TFLOPS` (longest name in its kind), or None."""
  kind = device.device_kind.lower()
  for name, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind:
      return tflops
  return None


def _dot_flops(eqn: Any) -> float:
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  return 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lhs_contract]))


def _conv_flops(eqn: Any) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  per_output = float(np.prod([rhs[d] for d in rhs_spec[1:]]))  # in features / groups x taps
  return 2.0 * float(np.prod(out)) * per_output


def _jaxprs_in(value: Any) -> list[jex_core.Jaxpr]:
  """The jaxprs held by an equation parameter (a jaxpr, a closed jaxpr or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _jaxprs_in(v)]
  return []


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
  """FLOPs of the matrix products and convolutions one evaluation of `jaxpr` runs.

  Sub-computations count as they run: a `scan` body `length` times, the costliest `cond`
  branch, a `while` body once (its trip count is not static). Custom-derivative rules count
  their primal function only.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max((jaxpr_flops(j) for j in _jaxprs_in(eqn.params["branches"])), default=0.0)
    elif name == "while":
      total += sum(jaxpr_flops(j) for j in _jaxprs_in(eqn.params["body_jaxpr"]))
    else:
      # pjit / remat / custom_jvp / custom_vjp / scan: the primal sub-jaxpr(s) in the params
      # (derivative rules are held as callables, not jaxprs, so they are not counted).
      subs = [j for v in eqn.params.values() for j in _jaxprs_in(v)]
      repeat = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
      total += repeat * sum(jaxpr_flops(j) for j in subs)
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """FLOPs of `fn(*args, **kwargs)` (matrix products and convolutions; nothing is run).

  Arguments may be arrays or `jax.ShapeDtypeStruct`s.
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def training_flops_per_image(model: Any, variables: Any, image_size: int,
                             channels: int = 3) -> float:
  """Model FLOPs of one training step per image: 3x the forward pass.

  The standard "model FLOPs" of MFU: backward = 2x forward; recomputation (remat) and the
  optimiser are not counted. The forward pass is traced at batch 1 in eval mode (dropout
  and BatchNorm statistics change no products).

  Args:
    model: a linen module taking `(images (1, size, size, channels) float32, train=False)`.
    variables: its variables, or their shapes (`jax.eval_shape` of `model.init`).
    image_size: input height = width.
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  return 3.0 * count_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
