"""Vision Transformer (Dosovitskiy et al. 2021), checkpoint-compatible with google-research.

The module tree and parameter names follow `vit_jax/models_vit.py` of
google-research/vision_transformer after its standard linen renaming
(`flax.training.checkpoints.convert_pre_linen`), which is also what big_vision uses:

  embedding/{kernel (p, p, 3, D), bias (D,)}        patch embedding: conv, stride p
  cls (1, 1, D)                                      class token (classifier="token")
  Transformer/posembed_input/pos_embedding (1, T, D) T = 1 + (H/p)(W/p) ("token") or (H/p)(W/p)
  Transformer/encoderblock_{i}/
      LayerNorm_0/{scale, bias}
      MultiHeadDotProductAttention_0/{query, key, value}/{kernel (D, heads, D/heads), bias}
      MultiHeadDotProductAttention_0/out/{kernel (heads, D/heads, D), bias (D,)}
      LayerNorm_1/{scale, bias}
      MlpBlock_0/Dense_0/{kernel (D, mlp), bias}, MlpBlock_0/Dense_1/{kernel (mlp, D), bias}
  Transformer/encoder_norm/{scale, bias}
  pre_logits/{kernel (D, R), bias}                   only when representation_size is set
  head/{kernel (D or R, classes), bias}

With `scan=True` the blocks are one `nn.scan`ned module, `Transformer/encoderblock/...`, every
leaf stacked on a leading axis of length `num_layers` (big_vision's layout);
`scan_params` / `unscan_params` convert between the two layouts.

Input: float NHWC images scaled to [-1, 1] (`normalize`), as the i21k / AugReg checkpoints
were trained. Output: float32 logits `(N, num_classes)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from etcjax.models import activations, cpu_dots

Array = jax.Array
Dtype = Any

INPUT_RANGE = (-1.0, 1.0)


def normalize(images: Array) -> Array:
  """Maps float images in [0, 1] (any shape) to the ViT input range [-1, 1]."""
  return images * 2.0 - 1.0


# Widths / depths / heads / MLP sizes of the paper's variants (ViT paper Table 1, DeiT for Ti
# and S), patch sizes from the variant name.
_VARIANTS = {
    "Ti": dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
}
CONFIG_NAMES = ("ViT-Ti_16", "ViT-S_16", "ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-tiny-test")


def get_config(name: str) -> ml_collections.ConfigDict:
  """Returns the architecture of a named variant (every `VisionTransformer` field but classes).

  Args:
    name: one of `CONFIG_NAMES`, e.g. "ViT-B_16" (ViT-Base, 16x16 patches).

  Returns:
    A ConfigDict whose keys are `VisionTransformer` attributes; pass it as
    `VisionTransformer(num_classes=..., **config)`. `representation_size` is None (no
    `pre_logits` layer), the fine-tuning setting of the paper (ViT-B/16: 85.81 M parameters
    with 10 classes).
  """
  if name == "ViT-tiny-test":
    arch = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  else:
    try:
      variant, patch = name.removeprefix("ViT-").split("_")
      arch = dict(_VARIANTS[variant], patch_size=int(patch))
    except (KeyError, ValueError):
      arch = None
    if arch is None or name not in CONFIG_NAMES:
      raise ValueError(f"unknown ViT config {name!r}; valid: {', '.join(CONFIG_NAMES)}")
  return ml_collections.ConfigDict(dict(
      arch, representation_size=None, classifier="token", dropout_rate=0.0,
      attention_dropout_rate=0.0, stochastic_depth=0.0, dtype="float32", remat=False,
      scan=False))


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
  """Stochastic depth: zeroes each example's residual branch with probability `rate`.

  Args:
    x: `(N, ...)` residual-branch output.
    rate: drop probability in [0, 1); a traced scalar is fine (per-layer rates under scan).
    rng: PRNG key.

  Returns:
    `x * keep / (1 - rate)` with `keep ~ Bernoulli(1 - rate)` per example, so the expectation
    is unchanged.
  """
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


ATTENTION_IMPLS = ("auto", "flax", "fused", "heads")


def fused_attention(query: Array, key: Array, value: Array) -> Array:
  """`jax.nn.dot_product_attention` on `(N, T, heads, head_dim)` (no mask, no dropout).

  On GPUs it can dispatch to cuDNN's fused (flash) attention for bf16/fp16 inputs; elsewhere
  it is XLA's softmax(q k^T / sqrt(d)) v, like Flax's default.
  """
  return jax.nn.dot_product_attention(query, key, value)


def _flat_xavier_uniform(fan_in_axes: int) -> nn.initializers.Initializer:
  """Xavier-uniform of the kernel flattened to 2-D (first `fan_in_axes` axes in, rest out):
  what `nn.DenseGeneral` draws, so that the same RNG gives the same values."""
  xavier = nn.initializers.xavier_uniform()

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    flat = (int(np.prod(shape[:fan_in_axes])), int(np.prod(shape[fan_in_axes:])))
    return xavier(key, flat, dtype).reshape(shape)

  return init


class _HeadsProjection(nn.Module):
  """Parameters of a q / k / v projection, as `nn.DenseGeneral(features=(heads, head_dim))`:
  `kernel (D, heads, head_dim)`, `bias (heads, head_dim)`; returns them, float32."""

  num_heads: int

  @nn.compact
  def __call__(self, d: int) -> tuple[Array, Array]:
    shape = (d, self.num_heads, d // self.num_heads)
    return (self.param("kernel", _flat_xavier_uniform(1), shape, jnp.float32),
            self.param("bias", nn.initializers.zeros, shape[1:], jnp.float32))


class HeadsSelfAttention(nn.Module):
  """Multi-head self-attention computed head-major, `(N, heads, T, head_dim)` throughout.

  The same function and parameters (`query`, `key`, `value`, `out`) as
  `nn.MultiHeadDotProductAttention` without dropout, and the same initial values from the
  same RNG. On CPU it avoids the token-major <-> head-major transposes around every
  attention matmul (fwd + bwd of one ViT-S/16 layer at batch 8: 13.7 ms instead of 20.1),
  and its backward pass takes the layouts of XLA:CPU's fast matmuls
  (`cpu_dots.heads_projections`, `cpu_dots.attention`).

  Call: `x (N, T, D) -> (N, T, D)`.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    head_dim = d // self.num_heads
    params = [_HeadsProjection(self.num_heads, name=name)(d) for name in ("query", "key", "value")]
    kernels = tuple(kernel.astype(self.dtype) for kernel, _ in params)
    projections = cpu_dots.heads_projections(x, kernels)
    q, k, v = (y + bias[:, None, :].astype(self.dtype)
               for y, (_, bias) in zip(projections, params, strict=True))
    y = cpu_dots.attention(q / jnp.sqrt(head_dim).astype(self.dtype), k, v)
    return _HeadsOutput(d, self.dtype, name="out")(y)


class _HeadsOutput(nn.Module):
  """Output projection of head-major `(N, heads, T, head_dim)` to `(N, T, D)`; parameters
  as `nn.DenseGeneral(D, axis=(-2, -1))`: `kernel (heads, head_dim, D)`, `bias (D,)`."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array) -> Array:
    shape = (y.shape[1], y.shape[3], self.features)
    kernel = self.param("kernel", _flat_xavier_uniform(2), shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.einsum("nhtk,hkd->ntd", y, kernel.astype(self.dtype)) + bias.astype(self.dtype)


def resolve_attention_impl(impl: str, attention_dropout_rate: float = 0.0) -> str:
  """Maps "auto" to "heads" on CPU and "fused" elsewhere ("flax" with attention dropout).

  Raises:
    ValueError: an unknown impl, or attention dropout with "fused" / "heads".
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
  if impl in ("fused", "heads") and attention_dropout_rate > 0:
    raise ValueError(f"attention_impl={impl!r} has no attention dropout; use 'flax' or set "
                     "attention_dropout_rate=0")
  if impl != "auto":
    return impl
  if attention_dropout_rate > 0:
    return "flax"
  return "heads" if jax.default_backend() == "cpu" else "fused"


MLP_IMPLS = ("auto", "dense", "cpu")


def resolve_mlp_impl(impl: str) -> str:
  """Maps "auto" to "cpu" on CPU and "dense" elsewhere.

  Raises:
    ValueError: an unknown impl.
  """
  if impl not in MLP_IMPLS:
    raise ValueError(f"unknown mlp_impl {impl!r}; valid: {', '.join(MLP_IMPLS)}")
  if impl != "auto":
    return impl
  return "cpu" if jax.default_backend() == "cpu" else "dense"


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> exact GELU -> dropout -> Dense(D) -> dropout.

  `impl="cpu"` differentiates the two matmuls with `cpu_dots.matmul` (weight gradients in
  the layouts of XLA:CPU's fast matmuls); "dense" with autodiff. Same function, parameters
  and initial values.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  impl: str = "dense"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    if self.impl == "cpu":
      inits["dot_general"] = cpu_dots.dense_dot_general
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, **inits)(x)
    x = activations.gelu(x)  # exact GELU; its backward pass keeps only x (21 % less memory)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(d, dtype=self.dtype, **inits)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  Call: `(x (N, T, D), drop_path_rate scalar, deterministic) -> (x (N, T, D), None)`; the
  `(carry, None)` return is the signature `nn.scan` wants.
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  use_drop_path: bool = False
  attention_impl: str = "flax"
  mlp_impl: str = "dense"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, drop_path_rate: Array | float, deterministic: bool
               ) -> tuple[Array, None]:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    if self.attention_impl == "heads":
      y = HeadsSelfAttention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(y)
    else:
      extra = dict(attention_fn=fused_attention) if self.attention_impl == "fused" else {}
      y = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, dtype=self.dtype,
          kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
          dropout_rate=self.attention_dropout_rate, deterministic=deterministic,
          name="MultiHeadDotProductAttention_0", **extra)(y, y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    if self.use_drop_path and not deterministic:
      y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.mlp_impl)(y, deterministic)
    if self.use_drop_path and not deterministic:
      y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
    return x + y, None


class AddPositionEmbs(nn.Module):
  """Adds a learned `pos_embedding (1, T, D)` (float32 parameter) to `(N, T, D)` tokens."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                    (1,) + x.shape[1:], jnp.float32)
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Position embedding + `num_layers` blocks + final LayerNorm; `(N, T, D)` -> same."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False
  attention_impl: str = "flax"
  mlp_impl: str = "dense"

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Stochastic depth grows linearly from 0 (first block) to `stochastic_depth` (last).
    rates = np.linspace(0.0, self.stochastic_depth, self.num_layers, dtype=np.float32)
    block_cls = Encoder1DBlock
    if self.remat:
      # Argument 3 (`deterministic`) selects Python control flow, so it must stay static.
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(3,), prevent_cse=not self.scan)
    kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                  dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  use_drop_path=self.stochastic_depth > 0,
                  attention_impl=self.attention_impl, mlp_impl=self.mlp_impl,
                  dtype=self.dtype)
    if self.scan:
      x, _ = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=self.num_layers,
      )(**kwargs, name="encoderblock")(x, jnp.asarray(rates), not train)
    else:
      for i in range(self.num_layers):
        x, _ = block_cls(**kwargs, name=f"encoderblock_{i}")(x, float(rates[i]), not train)
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class VisionTransformer(nn.Module):
  """ViT classifier.

  Attributes:
    num_classes: logits per image (0: return the pooled representation instead).
    patch_size: square patch side p; image height and width must be multiples of it.
    hidden_size: token width D.
    num_layers, num_heads, mlp_dim: encoder depth, attention heads, MLP hidden width.
    representation_size: width of the tanh `pre_logits` layer, or None for none.
    classifier: "token" (class token, as the paper) or "gap" (mean of the patch tokens).
    dropout_rate, attention_dropout_rate: dropout after each sublayer / on attention weights.
    stochastic_depth: final-layer drop-path rate (linear from 0 over the depth).
    dtype: computation dtype ("float32" or "bfloat16"); parameters and logits stay float32.
    remat: recompute each block's activations in the backward pass (saves memory).
    scan: run the blocks as one `nn.scan` (faster compiles for deep models; stacked params).
    attention_impl: "flax" (Flax's einsum-softmax attention), "fused"
      (`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs for bf16), "heads"
      (`HeadsSelfAttention`: head-major throughout, fastest on CPU) or "auto" ("heads" on CPU,
      else "fused"; "flax" when attention dropout is on, which only "flax" implements). All
      share parameters and initial values.
    mlp_impl: "dense" (autodiff of `nn.Dense`), "cpu" (weight gradients laid out for
      XLA:CPU's fast matmuls, `cpu_dots.matmul`) or "auto" ("cpu" on CPU, else "dense").
      Same function and parameters.

  Call: `(images (N, H, W, 3) float in [-1, 1], train: bool) -> logits (N, num_classes)`.
  Dropout and stochastic depth draw from the "dropout" RNG stream when `train=True`.
  """

  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  representation_size: int | None = None
  classifier: str = "token"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Any = "float32"
  remat: bool = False
  scan: bool = False
  attention_impl: str = "auto"
  mlp_impl: str = "auto"

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if self.classifier not in ("token", "gap"):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    attention_impl = resolve_attention_impl(self.attention_impl, self.attention_dropout_rate)
    mlp_impl = resolve_mlp_impl(self.mlp_impl)
    dtype = jnp.dtype(self.dtype)
    n, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                name="embedding")(images.astype(dtype))
    x = jnp.reshape(x, (n, -1, self.hidden_size))
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, self.hidden_size)), x],
                          axis=1)
    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, dtype=dtype, remat=self.remat, scan=self.scan,
        attention_impl=attention_impl, mlp_impl=mlp_impl, name="Transformer")(x, train=train)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=dtype, name="pre_logits")(x))
    if not self.num_classes:
      return x.astype(jnp.float32)
    x = nn.Dense(self.num_classes, dtype=dtype, kernel_init=nn.initializers.zeros,
                 name="head")(x)
    return x.astype(jnp.float32)



def _block_index(key: str) -> int | None:
  prefix = "encoderblock_"
  return int(key[len(prefix):]) if key.startswith(prefix) and key[len(prefix):].isdigit() else None


def scan_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Converts per-block params (`encoderblock_{i}`) to the `scan=True` layout.

  Every leaf of `Transformer/encoderblock_0..L-1` is stacked into
  `Transformer/encoderblock` with a leading axis of length L. Already-scanned params are
  returned unchanged (as a new dict).
  """
  params = dict(params)
  encoder = dict(params["Transformer"])
  keys = sorted((k for k in encoder if _block_index(k) is not None), key=_block_index)
  if keys:
    blocks = [encoder.pop(k) for k in keys]
    encoder["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  params["Transformer"] = encoder
  return params


def unscan_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `scan_params`: splits `Transformer/encoderblock` into `encoderblock_{i}`."""
  params = dict(params)
  encoder = dict(params["Transformer"])
  if "encoderblock" in encoder:
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  params["Transformer"] = encoder
  return params


def load_pretrained(path: str, model_config: Any, image_size: int | tuple[int, int],
                    num_classes: int) -> dict[str, Any]:
  """Loads a local pretrained checkpoint; see `etcjax.checkpoints.load_pretrained`.

  Accepts vision_transformer / big_vision `.npz` and timm / Hugging Face `.safetensors` files,
  resamples the position embedding to `image_size`, keeps or drops `pre_logits` following
  `model_config.representation_size` and keeps the head only when it has `num_classes`.
  """
  from etcjax import checkpoints  # Imported here: checkpoints imports this module.

  return checkpoints.load_pretrained(path, model_config, image_size, num_classes)
