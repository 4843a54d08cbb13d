"""Pure keyed EtC transforms: block scrambling, rotation/flip, negative-positive, channel shuffle.

The normative spec is DESIGN.md. Images are `(H, W, 3)` or `(N, H, W, 3)` (any number of
leading batch axes), `uint8` in [0, 255] or float in [0, 1]; `H` and `W` are multiples of
the block size `B`. Blocks are numbered in raster order, `b = r * (W/B) + c`, and for
every output block `i`:

    out_block[i] = chperm_i(negpos_i(rotflip_i(in_block[perm[i]])))

* `rotflip[i]` in 0..7: `np.rot90(block, k=rotflip[i] % 4)` over the (H, W) axes, then,
  if `rotflip[i] >= 4`, `np.fliplr` (reverse the W axis).
* `negpos[i]` in {0, 1}: if 1, `p -> p ^ 255` (uint8) or `p -> 1 - p` (float).
* `chperm[i]` in 0..5: index into `itertools.permutations((0, 1, 2))`; output channel
  `c` is input channel `PERMS3[chperm[i]][c]`.

`decrypt` is the exact inverse: bit-exact for uint8. For floats, `p -> 1 - p` rounds once,
so values round-trip bit-exactly when `1 - p` is exact in their dtype (e.g. multiples of
2^-8) and otherwise to within one ulp of 1.0 (6e-8 in float32).

`encrypt` / `decrypt` take NumPy or JAX arrays:

* JAX arrays, or any call under `jax.jit` / `jax.vmap` (traced schedule or images):
  jit-, vmap- and shard-safe (no host callbacks, no Python loop over blocks); returns a JAX
  array. Two implementations, chosen when the computation is lowered
  (`jax.lax.platform_dependent`), so one jitted function runs on any backend:

  - uint8 on CPU: a compiled XLA FFI kernel (etcjax/csrc/etc_cpu.cc: per block row one
    byte shuffle for channel order and column reversal plus the negpos XOR, AVX-512 VBMI
    where the CPU has it, a portable loop elsewhere; batch split over XLA's intra-op
    threads). It is built by `pip install` where a C++17 compiler exists and loaded on
    first use (`cpu_kernel_available`, `cpu_kernel_status`); `ETCJAX_ETC_KERNEL=0` turns it
    off. A batch-sharded jit runs it on each device's shard without collectives
    (`custom_partitioning`); vmap over images folds into its batch, vmap over schedules
    uses the gather.
  - everything else (GPU/TPU, float images, CPU without the kernel): pure `jax.numpy`, one
    gather whose source indices are computed arithmetically from the n-length schedule
    arrays (`source_index`), then negpos (`_transform_gather`).
* NumPy arrays with a concrete schedule: the host implementation of `etcjax.etc_np`
  (strided per-block copies vectorised over the batch, or `np.take` over the cached
  `source_index` map for very many blocks), which the owner-side tools use without
  importing JAX. Returns NumPy.

All give bit-identical results (tested).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import PartitionSpec as P

from etcjax import etc_np, ffi_library

# The per-block code tables (see the module doc), shared with the host implementation.
PERMS3 = etc_np.PERMS3  # (6, 3): output channel c of chperm code k is input PERMS3[k][c]
INV_CHPERM = etc_np.INV_CHPERM
TRANSPOSE, REV_Y, REV_X = etc_np.TRANSPOSE, etc_np.REV_Y, etc_np.REV_X
INV_ROTFLIP = etc_np.INV_ROTFLIP

Array = Any  # np.ndarray | jax.Array


@flax.struct.dataclass
class Schedule:
  """Per-geometry EtC key schedule: a JAX pytree (the four arrays are leaves).

  Attributes:
    perm: (n,) int, a permutation of 0..n-1; output block i takes input block perm[i].
    rotflip: (n,) int in 0..7 (see module doc).
    negpos: (n,) int in {0, 1}.
    chperm: (n,) int in 0..5.
    block_size: B, static.
    grid: (H/B, W/B) the schedule was made for, static; None means any geometry with
      n blocks (then only n is checked).
  """

  perm: Array
  rotflip: Array
  negpos: Array
  chperm: Array
  block_size: int = flax.struct.field(pytree_node=False, default=16)
  grid: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_blocks(self) -> int:
    return int(np.shape(self.perm)[-1])

  @classmethod
  def identity(cls, height: int, width: int, block_size: int = 16) -> Schedule:
    """The schedule that leaves images unchanged (for tests and baselines)."""
    rows, cols = _grid(height, width, block_size)
    n = rows * cols
    z = np.zeros(n, np.int32)
    return cls(perm=np.arange(n, dtype=np.int32), rotflip=z, negpos=z, chperm=z,
               block_size=block_size, grid=(rows, cols))

  def inverse(self) -> Schedule:
    """The schedule of `decrypt`: encrypt(encrypt(x, s), s.inverse()) == x.

    Block j of the plain image is block inv[j] of the cipher image (inv = perm^-1),
    transformed by the inverse of that block's rotflip and chperm (negpos is its own
    inverse, and the three per-block steps commute).
    """
    if _is_concrete(self):
      return self.replace(**etc_np.inverse_fields(self))
    perm = jnp.asarray(self.perm)
    inv = jnp.argsort(perm).astype(perm.dtype)
    return self.replace(perm=inv,
                        rotflip=jnp.asarray(INV_ROTFLIP)[jnp.asarray(self.rotflip)[inv]],
                        negpos=jnp.asarray(self.negpos)[inv],
                        chperm=jnp.asarray(INV_CHPERM)[jnp.asarray(self.chperm)[inv]])

  def validate(self) -> Schedule:
    """Checks shapes and value ranges (concrete schedules only); returns self."""
    if _is_concrete(self):
      etc_np.validate(self)
    return self


def _is_concrete(tree: Any) -> bool:
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


_grid = etc_np.grid_of


def _check(images: Array, schedule: Schedule) -> tuple[int, int]:
  """Validates images against the schedule; returns the block grid (rows, cols)."""
  shape = np.shape(images)
  if len(shape) < 3 or shape[-1] != 3:
    raise ValueError(f"expected images of shape (H, W, 3) or (N, H, W, 3), got {shape}")
  dtype = np.dtype(images.dtype)
  if dtype != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got {dtype}")
  if not isinstance(schedule, Schedule):
    raise ValueError(f"expected an etcjax.etc.Schedule, got {type(schedule).__name__}")
  return etc_np.check(shape, dtype, schedule, check_dtype=False)


def encrypt(images: Array, schedule: Schedule) -> Array:
  """EtC-encrypts images.

  Args:
    images: (..., H, W, 3) uint8 in [0, 255] or float in [0, 1], NumPy or JAX.
    schedule: the key schedule for (H, W, B), e.g. `key.schedule(H, W, B)`.

  Returns:
    Encrypted images, same shape and dtype (NumPy in -> NumPy out when the schedule is
    concrete; JAX otherwise).

  Raises:
    ValueError: wrong rank/channels/dtype, H or W not a multiple of B, or a schedule
      made for another geometry.
  """
  return _transform(images, schedule)


def decrypt(images: Array, schedule: Schedule) -> Array:
  """Inverts `encrypt` with the same schedule. Same conventions as `encrypt`."""
  _check(images, schedule)
  return _transform(images, schedule.inverse())


def _transform(images: Array, schedule: Schedule) -> Array:
  grid = _check(images, schedule)
  if isinstance(images, np.ndarray) and _is_concrete(schedule):
    return _transform_np(images, schedule.validate(), grid)
  return _transform_jnp(jnp.asarray(images), schedule, grid)


def source_index(perm: Array, rotflip: Array, chperm: Array, grid: tuple[int, int],
                 block_size: int, xp=jnp) -> Array:
  """Flat source index of every output byte of one (H, W, 3) image; int32 (H*W*3,).

  `out.reshape(-1)[k] = in.reshape(-1)[index[k]]` (before negpos) for the schedule's
  block permutation, rotation/flip and channel shuffle. Computed arithmetically from the
  per-block arrays (no per-element tables), with `xp` = `jax.numpy` (traceable) or `numpy`
  (`etcjax.etc_np.source_index`).
  """
  return etc_np.source_index(perm, rotflip, chperm, grid, block_size, xp=xp)


_blocks_to_image = etc_np.blocks_to_image
_negpos_map = etc_np.negpos_map

_FIELDS = etc_np.FIELDS


def _transform_jnp(x: jax.Array, s: Schedule, grid: tuple[int, int]) -> jax.Array:
  """JAX transform: the CPU kernel for uint8 on CPU where built, else the XLA gather.

  uint8 images with the kernel loaded (`cpu_kernel_available`) and not disabled
  (`ETCJAX_ETC_KERNEL=0`) go through `jax.lax.platform_dependent`: the FFI kernel when the
  computation is lowered for CPU, `_transform_gather` for GPU/TPU. Float images always use
  `_transform_gather`.
  """
  fields = tuple(jnp.asarray(getattr(s, f)) for f in _FIELDS)
  if x.dtype == jnp.uint8 and _kernel_enabled():
    fields = tuple(f.astype(jnp.int32) for f in fields)
    return jax.lax.platform_dependent(x, *fields, cpu=_kernel_branch(grid, s.block_size),
                                      default=_gather_branch(grid, s.block_size))
  return _transform_gather(x, *fields, grid=grid, block_size=s.block_size)


def _transform_gather(x: jax.Array, perm: jax.Array, rotflip: jax.Array, negpos: jax.Array,
                      chperm: jax.Array, *, grid: tuple[int, int],
                      block_size: int) -> jax.Array:
  """Pure-jnp transform: one gather with arithmetic source indices, then negpos.

  The path for GPU/TPU, float images, and CPU without the compiled kernel. x: (..., H, W, 3)
  uint8 or float; the schedule fields are (n,) integer arrays.

  XLA:CPU measurements (benchmarks/bench_etc.py) drove this form: one gather whose index
  map is computed once per call from the n-length schedule arrays beat compositions of
  transposes and per-block selects, which XLA:CPU emits as scalar loops over 3-byte pixels.
  Also measured and rejected (JAX 0.10.2, 224x224, batch 256, donated output; % of a
  preallocated copy): pixels packed into uint32 words around a word gather (3x fewer
  gathered elements: 0.5x at batch 256, 1.6x at batch 32), a block-row gather from a
  stacked block-transposed copy, per-block dynamic-slice loops and scatters (each stage
  15-30 %, under 5 % composed). Looping over chunks of the batch (`lax.map`) gains ~1.5x on
  CPU but makes SPMD all-gather a sharded batch, so it is not done here. Even at its best
  the gather stays a scalar loop per byte (~10-12 % of the copy), hence the CPU kernel.
  """
  shape = x.shape
  index = source_index(perm, rotflip, chperm, grid, block_size)
  neg = _negpos_map(negpos, grid, block_size, jnp)
  flat = x.reshape((-1, index.shape[0]))
  # The index map is a permutation, so the gather is in bounds with unique indices.
  out = flat.at[:, index].get(mode="promise_in_bounds", unique_indices=True).reshape(
      (-1,) + shape[-3:])
  if x.dtype == jnp.uint8:
    out = out ^ (neg.astype(jnp.uint8) * jnp.uint8(255))
  else:
    out = jnp.where(neg, 1 - out, out)
  return out.reshape(shape)


# ---------------------------------------------------------------------------------------
# CPU kernel (etcjax/csrc/etc_cpu.cc): an XLA FFI custom call for uint8 images.
#
# Built by `pip install` when a C++17 compiler exists (setup.py, optional extension
# `etcjax._etc_cpu`), loaded with ctypes and registered with XLA on first use. Around the
# FFI call: `custom_partitioning` keeps a batch-sharded jit free of collectives (each device
# transforms its own images), and `custom_vmap` folds a vmapped image axis into the batch
# (a vmap over schedules falls back to the gather).

_KERNEL_TARGET = "etcjax_etc_transform_u8"
_KERNEL_ENV = "ETCJAX_ETC_KERNEL"


@functools.cache
def _kernel() -> tuple[Any, str]:
  """Loads and registers the kernel once; returns (ctypes library or None, status)."""
  return ffi_library.load(
      "etcjax._etc_cpu", {_KERNEL_TARGET: "EtcTransformU8"},
      describe=lambda lib: "AVX-512 VBMI" if lib.EtcTransformU8Simd() else "portable loop",
      self_test=lambda: _kernel_self_test())


def _kernel_self_test() -> str | None:
  """Runs the kernel on a small batch (every rotflip, chperm, both negpos); None if right."""
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
  s = Schedule(perm=np.array([3, 5, 0, 7, 1, 4, 2, 6]), rotflip=np.arange(8),
               negpos=np.array([1, 0, 1, 0, 0, 1, 1, 0]),
               chperm=np.array([0, 1, 2, 3, 4, 5, 0, 1]), block_size=16, grid=(2, 4))
  want = _transform_np(x, s, (2, 4))
  fields = [np.asarray(getattr(s, f), np.int32) for f in _FIELDS]
  with jax.ensure_compile_time_eval():  # runs now, also when first used inside a trace
    got = np.asarray(_ffi_call(jnp.asarray(x), *fields, 16))
  return None if np.array_equal(got, want) else "wrong output"


def cpu_kernel_available() -> bool:
  """Whether the compiled CPU kernel for uint8 images is built and registered with JAX.

  When it is, `encrypt` / `decrypt` of uint8 JAX arrays (and anything under `jax.jit`) run
  it on CPU unless the environment variable `ETCJAX_ETC_KERNEL=0` forces the XLA gather
  (read when a function is traced). GPU/TPU always use the gather.
  """
  return _kernel()[0] is not None


def cpu_kernel_status() -> str:
  """One line on the CPU kernel: loaded (and which code path) or why not."""
  return _kernel()[1]


def _kernel_enabled() -> bool:
  return os.environ.get(_KERNEL_ENV, "1").strip() != "0" and cpu_kernel_available()


def _kernel_call(x: jax.Array, perm: jax.Array, rotflip: jax.Array, negpos: jax.Array,
                 chperm: jax.Array, block_size: int, *, threads: int = 0,
                 simd: bool = True) -> jax.Array:
  """The bare kernel (for tests and benchmarks): x (..., H, W, 3) uint8 -> like x.

  The fields are int32 (n,). `threads` caps the intra-op threads (0: all); `simd=False`
  forces the portable loop. Raises RuntimeError when the kernel is unavailable.
  """
  if _kernel()[0] is None:
    raise RuntimeError(f"etcjax CPU kernel: {cpu_kernel_status()}")
  return _ffi_call(x, perm, rotflip, negpos, chperm, block_size, threads, simd)


def _ffi_call(x, perm, rotflip, negpos, chperm, block_size, threads=0, simd=True):
  """`_kernel_call` without the availability check (used while loading, and by XLA)."""
  call = jax.ffi.ffi_call(_KERNEL_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="sequential")
  return call(x, perm, rotflip, negpos, chperm, block_size=np.int64(block_size),
              threads=np.int64(threads), simd=bool(simd))


def _batch_sharding(sharding: Any, ndim: int, mesh: Any) -> jax.sharding.Sharding:
  """`sharding` of an (..., H, W, 3) array kept on the batch axes only (H, W, 3 replicated)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, P(*spec[:ndim - 3], None, None, None))
  return jax.sharding.NamedSharding(mesh, P())  # unknown form: replicate (correct, slower)


def _partition(block_size, mesh, arg_shapes, result_shape):
  del result_shape
  x = arg_shapes[0]
  xs = _batch_sharding(x.sharding, len(x.shape), mesh)
  repl = jax.sharding.NamedSharding(xs.mesh, P())
  lower = lambda *args: _ffi_call(*args, block_size)
  return xs.mesh, lower, xs, (xs, repl, repl, repl, repl)


def _infer_sharding(block_size, mesh, arg_shapes, result_shape):
  del block_size, result_shape
  return _batch_sharding(arg_shapes[0].sharding, len(arg_shapes[0].shape), mesh)


def _kernel_default(x, perm, rotflip, negpos, chperm, block_size):
  return _ffi_call(x, perm, rotflip, negpos, chperm, block_size)


_kernel_partitioned = custom_partitioning(_kernel_default, static_argnums=(5,))
# Shardy: the leading (batch) factors pass through, H, W, channels and the schedule stay
# whole on every device. GSPMD (jax_use_shardy_partitioner=False) uses the callbacks.
_kernel_partitioned.def_partition(
    partition=_partition, infer_sharding_from_operands=_infer_sharding,
    propagate_user_sharding=lambda block_size, mesh, user: _batch_sharding(
        user.sharding, len(user.shape), mesh),
    sharding_rule="... h w c, n, n, n, n -> ... h w c",
    need_replication_factors=("h", "w", "c", "n"))


@functools.lru_cache(maxsize=64)
def _gather_branch(grid: tuple[int, int], block_size: int):
  return functools.partial(_transform_gather, grid=grid, block_size=block_size)


@functools.lru_cache(maxsize=64)
def _kernel_branch(grid: tuple[int, int], block_size: int):
  """The CPU branch for one geometry: the partitioned FFI call under a custom vmap rule."""

  @jax.custom_batching.custom_vmap
  def kernel(x, perm, rotflip, negpos, chperm):
    return _kernel_partitioned(x, perm, rotflip, negpos, chperm, block_size)

  @kernel.def_vmap
  def _vmap_rule(axis_size, in_batched, x, *fields):
    del axis_size
    if not any(in_batched[1:]):  # images only: the vmapped axis is one more batch axis
      return kernel(x, *fields), True
    # One schedule per example: the vectorised gather.
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(_gather_branch(grid, block_size), in_axes=axes)(x, *fields), True

  return kernel


# The host (NumPy) implementation lives in etcjax.etc_np, which imports no JAX.
_HOST_LOOP_MAX_BLOCKS = etc_np.HOST_LOOP_MAX_BLOCKS
_transform_np = etc_np.transform
