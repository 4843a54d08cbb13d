"""Key-adapted plain ViTs: a plain model that gives the same logits on EtC images.

    module, variables = etcjax.models.adapt_to_key("ViT-B_16", plain_variables, schedule)
    logits = module.apply(variables, normalize(encrypt(x01, schedule)))  # == plain on x01

Why it is exact (DESIGN.md's EtC spec; `etcjax.etc`). Output block i of an EtC image is
plain block perm[i] after rotation/flip, negative-positive and channel shuffle. Mapped to
the ViT input range [-1, 1], negative-positive `p -> 1 - p` becomes `v -> -v`, so every
step is a *signed permutation* of the block's pixels: `E_i[y, x, c] = s_i P[σ_i(y, x, c)]`.
With patch size p = block size B, the plain patch embedding `sum K[y, x, c] P[y, x, c]`
equals `sum K'_i[y, x, c] E_i[y, x, c]` for `K'_i = s_i K[σ_i]`, i.e. the plain kernel
"encrypted" with block i's own state (negative-positive as a sign flip); the bias stays.
Token i then equals plain token perm[i], so token i gets plain position perm[i]'s position
embedding (the class token keeps its own). Self-attention, the MLPs and the LayerNorms
treat tokens as a set, so the class token, and the logits, are those of the plain model on
the plain image (up to float rounding of the reordered sums).

EtC keys differ per block, so the adapted model has one patch embedding per token
position (`AdaptedVisionTransformer`, `embedding/kernel (n, p, p, 3, D)`, model name
"<ViT name>-adapted"). When every block shares one rotation/flip, negative-positive and
channel shuffle (the block-shared keys of Kiya et al., IEICE 2023), one kernel serves all
positions and the result is a plain `VisionTransformer` (checkpoint-compatible). Block
sizes that are multiples of the patch size adapt too (each patch of an EtC block is a
rotated patch of one plain block); patches larger than a block would mix several plain
blocks and are refused, as are ConvMixer (its depthwise convolutions mix each patch with
its neighbours, which EtC moves elsewhere and rotates), ResNet and PyramidNet (overlapping
convolutions and pooling across block borders): for those no exact adaptation exists.

What it leaks: the adapted kernels are the public plain kernel under each block's state,
and the position embeddings are the plain ones permuted, so whoever also holds the plain
weights reads the schedule back (`etcjax.attacks.model_leak`). Hand out an adapted model
only where its plain parent is not available.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from etcjax import etc
from etcjax.models import vit

ADAPTED_SUFFIX = "-adapted"
# Registry names of the per-position models: "ViT-B_16-adapted", ...
CONFIG_NAMES = tuple(n + ADAPTED_SUFFIX for n in vit.CONFIG_NAMES)
INPUT_RANGE = vit.INPUT_RANGE
normalize = vit.normalize

Array = jax.Array

_NO_EXACT = {
    "ConvMixer": "its depthwise convolutions see each patch together with its neighbouring "
                 "patches, which EtC moves to other positions and rotates",
    "ResNet": "its convolutions and pooling overlap block borders, so no layer sees one EtC "
              "block on its own",
    "ShakePyramidNet": "its convolutions and pooling overlap block borders, so no layer sees "
                       "one EtC block on its own",
}


class PositionwisePatchEmbedding(nn.Module):
  """Patch embedding with one kernel per token position (EtC-adapted ViTs).

  Parameters: `kernel (n, p, p, 3, D)` (per position, HWIO like the plain conv) and
  `bias (D,)` shared by all positions.

  Call: `images (N, H, W, 3) float -> tokens (N, n, D)`, n = (H/p)(W/p) in raster order.
  """

  patch_size: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    n, h, w, c = images.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    patches = images.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, gh * gw, p * p * c)
    kernel = self.param("kernel", _positionwise_init, (gh * gw, p, p, c, self.hidden_size),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), jnp.float32)
    kernel = kernel.reshape(gh * gw, p * p * c, self.hidden_size).astype(self.dtype)
    tokens = jnp.einsum("nqk,qkd->nqd", patches.astype(self.dtype), kernel,
                        precision=jax.lax.Precision.HIGHEST)
    return tokens + bias.astype(self.dtype)


def _positionwise_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """LeCun-normal per position (what `nn.Conv` draws for one (p, p, 3, D) kernel)."""
  keys = jax.random.split(key, shape[0])
  return jax.vmap(lambda k: nn.initializers.lecun_normal()(k, shape[1:], dtype))(keys)


class AdaptedVisionTransformer(vit.VisionTransformer):
  """`vit.VisionTransformer` with a `PositionwisePatchEmbedding` (same other parameters).

  Call: `(images (N, H, W, 3) float in [-1, 1], train) -> logits (N, num_classes)` float32;
  H and W fix the number of positions (the image size the model was adapted for).
  """

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    if self.classifier not in ("token", "gap"):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    attention_impl = vit.resolve_attention_impl(self.attention_impl,
                                                self.attention_dropout_rate)
    mlp_impl = vit.resolve_mlp_impl(self.mlp_impl)
    dtype = jnp.dtype(self.dtype)
    n, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = PositionwisePatchEmbedding(p, self.hidden_size, dtype, name="embedding")(images)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, self.hidden_size)), x],
                          axis=1)
    x = vit.Encoder(
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


def get_config(name: str):
  """The architecture of an adapted name: that of its plain ViT (`vit.get_config`)."""
  return vit.get_config(plain_name(name))


def plain_name(name: str) -> str:
  """"ViT-B_16-adapted" -> "ViT-B_16"; ValueError for a name that is not adapted."""
  if name not in CONFIG_NAMES:
    raise ValueError(f"unknown adapted model {name!r}; valid: {', '.join(CONFIG_NAMES)}")
  return name[:-len(ADAPTED_SUFFIX)]


def create(name: str, num_classes: int, **overrides: Any) -> AdaptedVisionTransformer:
  """An unbound adapted ViT of a registered name (what `etcjax.models.create` returns).

  Raises:
    ValueError: unknown name or override (the message lists the valid ones).
  """
  fields = dict(get_config(name))
  valid = set(AdaptedVisionTransformer.__dataclass_fields__) - {"parent", "name",
                                                               "num_classes"}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
                     f"valid: {', '.join(sorted(valid))}")
  return AdaptedVisionTransformer(num_classes=num_classes, **{**fields, **overrides})


# --------------------------------------------------------------------------------------
# The adaptation.


def no_exact_adaptation_reason(name: str) -> str | None:
  """Why model `name` has no exact key adaptation, or None for a plain ViT."""
  if name in vit.CONFIG_NAMES:
    return None
  if name in CONFIG_NAMES:
    return "it is already adapted to a key"
  for family, why in _NO_EXACT.items():
    if name.startswith(family):
      return why
  return "only ViTs (patch embedding + permutation-equivariant self-attention) adapt exactly"


def patch_maps(schedule: etc.Schedule, patch_size: int) -> dict[str, np.ndarray]:
  """Where every input of every EtC patch comes from in the plain image.

  Args:
    schedule: a concrete EtC schedule with its grid (`key.schedule(H, W, B)`).
    patch_size: p; B must be a multiple of p.

  Returns:
    `perm (n,)` int: EtC patch q holds plain patch perm[q] (raster order, n = HW/p^2);
    `offset (n, p, p, 3)` int: flat index `(y * p + x) * 3 + c` in that plain patch of
    EtC patch q's input (y, x, c); `sign (n, p, p, 3)` float32 +-1 (-1: negative-positive).

  Raises:
    ValueError: a schedule without a grid, or p not a divisor of B (an EtC patch would
      then hold parts of several plain blocks: no exact adaptation).
  """
  b = schedule.block_size
  if schedule.grid is None:
    raise ValueError("the schedule has no geometry (make it with key.schedule(H, W, B))")
  if patch_size < 1 or b % patch_size:
    raise ValueError(f"the ViT's patch size {patch_size} does not divide the EtC block size "
                     f"{b}: a patch would hold parts of several scrambled blocks, so no exact "
                     f"adaptation exists (use patch size {b})")
  schedule = schedule.validate()
  rows, cols = schedule.grid
  h, w, p = rows * b, cols * b, patch_size
  fields = [np.asarray(getattr(schedule, f)) for f in ("perm", "rotflip", "chperm")]
  src = etc.source_index(*fields, grid=(rows, cols), block_size=b, xp=np).reshape(h, w, 3)
  pixel, chan = src // 3, src % 3
  sy, sx = pixel // w, pixel % w
  neg = np.repeat(np.repeat(np.asarray(schedule.negpos).reshape(rows, cols), b, 0), b, 1)
  sign = np.broadcast_to(np.where(neg, -1.0, 1.0)[..., None], (h, w, 3)).astype(np.float32)
  as_patches = lambda a: a.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(
      -1, p, p, 3)
  src_patch = as_patches((sy // p) * (w // p) + sx // p)
  perm = src_patch[:, 0, 0, 0]
  assert (src_patch == perm[:, None, None, None]).all()  # p divides B: one source patch
  offset = as_patches(((sy % p) * p + sx % p) * 3 + chan)
  return {"perm": perm.astype(np.int64), "offset": offset.astype(np.int64),
          "sign": as_patches(sign)}


def adapt_to_key(name: str, variables: Mapping[str, Any], schedule: etc.Schedule, *,
                 num_classes: int | None = None, **overrides: Any
                 ) -> tuple[nn.Module, dict[str, Any]]:
  """Transforms a plain ViT so that it gives the same logits on EtC images.

  Args:
    name: the plain model's registry name, e.g. "ViT-B_16" (`vit.CONFIG_NAMES`).
    variables: its Flax variables `{"params": ...}` (per-block or scanned layout).
    schedule: the EtC schedule of the images it will see, `key.schedule(H, W, B)`, with
      H x W the model's image size and B a multiple of the patch size.
    num_classes: logits per image; None = the head's width.
    **overrides: module attributes as for `etcjax.models.create` (e.g. `num_layers`,
      `dtype`); the architecture must match `variables`.

  Returns:
    `(module, variables)`: `module.apply(variables, normalize(encrypt(x, schedule)))` equals
    the plain model's logits on `normalize(x)` (float rounding aside). For block-shared
    schedules (one rotation/flip, negative-positive and channel shuffle for all blocks) the
    module is a plain `vit.VisionTransformer` with one adapted kernel; otherwise an
    `AdaptedVisionTransformer` (registry name `name + "-adapted"`) with one per position.
    The input variables are not modified.

  Raises:
    ValueError: a model without an exact adaptation (ConvMixer, ResNet; the message says
      why), a patch size that does not divide the block size, or a schedule made for
      another image size than the model's position embedding.
  """
  why = no_exact_adaptation_reason(name)
  if why is not None:
    raise ValueError(f"model {name!r} cannot be adapted to an EtC key exactly: {why}")
  params = variables["params"]
  kernel = np.asarray(params["embedding"]["kernel"], np.float32)
  if kernel.ndim != 4:
    raise ValueError(f"the embedding kernel has shape {kernel.shape}; expected a plain ViT's "
                     "(p, p, 3, D)")
  p, _, _, d = kernel.shape
  if num_classes is None:
    num_classes = int(np.shape(params["head"]["bias"])[0]) if "head" in params else 0
  module_fields = dict(vit.get_config(name), **overrides)
  if module_fields["patch_size"] != p:
    raise ValueError(f"{name} has patch size {module_fields['patch_size']} but the variables' "
                     f"embedding kernel is {p}x{p}")
  maps = patch_maps(schedule, p)
  n = len(maps["perm"])
  pos = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"], np.float32)
  extra = pos.shape[1] - n
  if extra not in (0, 1):
    rows, cols = schedule.grid
    b = schedule.block_size
    raise ValueError(f"the schedule is for {rows * b}x{cols * b} images ({n} patches) but "
                     f"the model's position embedding has {pos.shape[1]} tokens; adapt a "
                     f"model trained at that image size")
  # K'_q[y, x, c] = s_q K[offset_q(y, x, c)]: the plain kernel under patch q's state.
  flat = kernel.reshape(p * p * 3, d)
  kernels = flat[maps["offset"]] * maps["sign"][..., None]  # (n, p, p, 3, D)
  new_pos = pos.copy()
  new_pos[:, extra:] = pos[:, extra + maps["perm"]]
  shared = bool(np.all(maps["offset"] == maps["offset"][:1])
                and np.all(maps["sign"] == maps["sign"][:1]))
  new_params = dict(params)
  new_params["embedding"] = {**params["embedding"],
                             "kernel": jnp.asarray(kernels[0] if shared else kernels)}
  new_params["Transformer"] = {**params["Transformer"], "posembed_input": {
      **params["Transformer"]["posembed_input"], "pos_embedding": jnp.asarray(new_pos)}}
  cls = vit.VisionTransformer if shared else AdaptedVisionTransformer
  module = cls(num_classes=num_classes, **module_fields)
  return module, {**variables, "params": new_params}


def adapted_name(name: str, variables: Mapping[str, Any]) -> str:
  """The registry name of `adapt_to_key(name, ...)`'s module: `name` for block-shared
  keys (a plain ViT), `name + "-adapted"` for per-position embeddings."""
  ndim = np.ndim(variables["params"]["embedding"]["kernel"])
  return name + ADAPTED_SUFFIX if ndim == 5 else name


def shared_schedule(schedule: etc.Schedule, block: int = 0) -> etc.Schedule:
  """The block-shared variant of `schedule`: its block permutation, with block `block`'s
  rotation/flip, negative-positive and channel shuffle for every block (Kiya et al.)."""
  n = schedule.num_blocks
  same = lambda a: np.full(n, np.asarray(a)[block], np.int32)
  return schedule.replace(rotflip=same(schedule.rotflip), negpos=same(schedule.negpos),
                          chperm=same(schedule.chperm))


__all__ = ["AdaptedVisionTransformer", "PositionwisePatchEmbedding", "adapt_to_key",
           "adapted_name", "create", "no_exact_adaptation_reason", "patch_maps",
           "shared_schedule"]
