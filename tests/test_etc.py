"""Tests for etcjax.etc against a slow, obviously-correct reference written from the spec."""

import itertools
import os
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _runs import run_on_fake_devices

from etcjax import etc, keys

PERMS3 = list(itertools.permutations((0, 1, 2)))


def reference_encrypt(img: np.ndarray, perm, rotflip, negpos, chperm, b: int) -> np.ndarray:
  """DESIGN.md's table, one block at a time. img: (H, W, 3)."""
  h, w, _ = img.shape
  cols = w // b
  blocks = [img[r * b:(r + 1) * b, c * b:(c + 1) * b] for r in range(h // b) for c in range(cols)]
  out = np.empty_like(img)
  for i in range(len(blocks)):
    blk = np.rot90(blocks[perm[i]], k=rotflip[i] % 4, axes=(0, 1))
    if rotflip[i] >= 4:
      blk = np.fliplr(blk)
    if negpos[i]:
      blk = blk ^ 255 if blk.dtype == np.uint8 else 1 - blk
    blk = blk[:, :, list(PERMS3[chperm[i]])]
    r, c = divmod(i, cols)
    out[r * b:(r + 1) * b, c * b:(c + 1) * b] = blk
  return out


def ref_batch(x, s):
  f = lambda im: reference_encrypt(im, *(np.asarray(getattr(s, k)) for k in
                                          ("perm", "rotflip", "negpos", "chperm")),
                                   s.block_size)
  return np.stack([f(im) for im in x.reshape((-1,) + x.shape[-3:])]).reshape(x.shape)


def images(shape, dtype=np.uint8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, shape, dtype=np.uint8)
  return x if dtype == np.uint8 else (x / 255).astype(dtype)


def schedule(h, w, b, seed=0):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    return keys.EtcKey.insecure_from_seed(seed).schedule(h, w, b)


GEOMS = [(32, 32, 16), (64, 48, 16), (48, 64, 8), (12, 20, 4), (8, 8, 1), (224, 224, 16),
         (64, 80, 2)]  # 1280 blocks: the host path switches to np.take


@pytest.mark.parametrize("geom", GEOMS)
def test_matches_reference_uint8(geom):
  h, w, b = geom
  s = schedule(h, w, b)
  x = images((3, h, w, 3))
  want = ref_batch(x, s)
  got_np = etc.encrypt(x, s)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == np.uint8
  np.testing.assert_array_equal(got_np, want)
  got_jax = etc.encrypt(jnp.asarray(x), s)
  assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(got_jax), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(etc.encrypt)(x, s)), want)
  # Round trip, bit-exact, on both paths.
  np.testing.assert_array_equal(etc.decrypt(got_np, s), x)
  np.testing.assert_array_equal(np.asarray(jax.jit(etc.decrypt)(got_jax, s)), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize("geom", [(32, 32, 16), (48, 64, 8)])
def test_matches_reference_float(geom, dtype):
  h, w, b = geom
  s = schedule(h, w, b, seed=5)
  x = images((2, h, w, 3), np.float32).astype(dtype)
  want = ref_batch(x, s)
  got = etc.encrypt(x, s)
  assert got.dtype == x.dtype
  np.testing.assert_array_equal(got, want)
  xj = jnp.asarray(x)  # float64 becomes float32 unless jax_enable_x64 is set.
  got = etc.encrypt(xj, s)
  assert got.dtype == xj.dtype
  np.testing.assert_array_equal(np.asarray(got), ref_batch(np.asarray(xj), s))
  # float: 1 - (1 - p) == p only up to one rounding of 1 - p (see etc module doc).
  for inp in (x, xj):
    back = np.asarray(etc.decrypt(etc.encrypt(inp, s), s), np.float64)
    np.testing.assert_allclose(back, np.asarray(inp, np.float64), rtol=0,
                               atol=float(jnp.finfo(inp.dtype).eps))
  # Values on a dyadic grid (here k/256) round-trip bit-exactly.
  d = (images((2, h, w, 3)) / 256).astype(dtype)
  np.testing.assert_array_equal(etc.decrypt(etc.encrypt(d, s), s), d)
  np.testing.assert_array_equal(np.asarray(etc.decrypt(etc.encrypt(jnp.asarray(d), s), s)), d)


def test_float_agrees_with_uint8():
  s = schedule(64, 64, 16, seed=2)
  x = images((2, 64, 64, 3))
  enc_u8 = etc.encrypt(x, s).astype(np.float64) / 255
  enc_f = np.asarray(etc.encrypt(jnp.asarray(x / 255, jnp.float32), s), np.float64)
  np.testing.assert_allclose(enc_f, enc_u8, atol=1e-6)


def test_single_image_and_extra_batch_axes():
  s = schedule(32, 48, 16, seed=1)
  x = images((2, 3, 32, 48, 3))
  want = ref_batch(x, s)
  np.testing.assert_array_equal(etc.encrypt(x, s), want)
  np.testing.assert_array_equal(np.asarray(etc.encrypt(jnp.asarray(x), s)), want)
  np.testing.assert_array_equal(etc.encrypt(x[0, 1], s), want[0, 1])
  np.testing.assert_array_equal(np.asarray(etc.encrypt(jnp.asarray(x[0, 1]), s)), want[0, 1])


def _both(x, s):
  a = etc.encrypt(x, s)
  b = np.asarray(etc.encrypt(jnp.asarray(x), s))
  np.testing.assert_array_equal(a, b)
  return a


def test_identity_schedule():
  x = images((2, 48, 32, 3))
  s = etc.Schedule.identity(48, 32, 16)
  np.testing.assert_array_equal(_both(x, s), x)


def test_each_step_in_isolation():
  h, w, b = 32, 48, 16
  x = images((1, h, w, 3), seed=3)
  n = 6
  z = np.zeros(n, np.int32)
  blocks = lambda im: [im[0, r * b:(r + 1) * b, c * b:(c + 1) * b] for r in range(2)
                       for c in range(3)]
  # Permutation only.
  perm = np.array([5, 3, 0, 1, 4, 2], np.int32)
  out = _both(x, etc.Schedule(perm=perm, rotflip=z, negpos=z, chperm=z, block_size=b))
  for i, blk in enumerate(blocks(out)):
    np.testing.assert_array_equal(blk, blocks(x)[perm[i]])
  ident = np.arange(n, dtype=np.int32)
  # Each rotflip code alone, against numpy's rot90 / fliplr.
  for code in range(8):
    s = etc.Schedule(perm=ident, rotflip=np.full(n, code, np.int32), negpos=z, chperm=z,
                     block_size=b)
    for blk_out, blk_in in zip(blocks(_both(x, s)), blocks(x), strict=True):
      want = np.rot90(blk_in, k=code % 4)
      want = np.fliplr(want) if code >= 4 else want
      np.testing.assert_array_equal(blk_out, want, err_msg=f"rotflip {code}")
  # negpos on alternate blocks.
  neg = np.array([1, 0, 1, 0, 0, 1], np.int32)
  out = _both(x, etc.Schedule(perm=ident, rotflip=z, negpos=neg, chperm=z, block_size=b))
  for i, (bo, bi) in enumerate(zip(blocks(out), blocks(x), strict=True)):
    np.testing.assert_array_equal(bo, 255 - bi if neg[i] else bi)
  # Each chperm code alone.
  for code in range(6):
    s = etc.Schedule(perm=ident, rotflip=z, negpos=z, chperm=np.full(n, code, np.int32),
                     block_size=b)
    np.testing.assert_array_equal(_both(x, s), x[..., list(PERMS3[code])])


def test_block_value_multiset_preserved_up_to_negpos():
  s = schedule(64, 64, 16, seed=9)
  x = images((1, 64, 64, 3), seed=4)[0]
  y = etc.encrypt(x, s)
  blk = lambda im, i: im[(i // 4) * 16:(i // 4 + 1) * 16, (i % 4) * 16:(i % 4 + 1) * 16]
  for i in range(16):
    got = blk(y, i) ^ np.uint8(255 * s.negpos[i])
    np.testing.assert_array_equal(np.sort(got, axis=None), np.sort(blk(x, s.perm[i]), axis=None))


def test_inverse_schedule_is_an_inverse():
  s = schedule(64, 32, 8, seed=4)
  x = images((2, 64, 32, 3))
  np.testing.assert_array_equal(etc.encrypt(etc.encrypt(x, s), s.inverse()), x)
  np.testing.assert_array_equal(etc.encrypt(etc.encrypt(x, s.inverse()), s), x)
  inv_traced = jax.jit(lambda s: s.inverse())(s)
  for name in ("perm", "rotflip", "negpos", "chperm"):
    np.testing.assert_array_equal(np.asarray(getattr(inv_traced, name)),
                                  np.asarray(getattr(s.inverse(), name)))


def test_schedule_is_a_pytree():
  s = schedule(32, 32, 16)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 4
  s2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert s2.block_size == 16 and s2.grid == (2, 2) and s2.num_blocks == 4


def test_jit_and_vmap_agree():
  s = schedule(32, 64, 16, seed=6)
  x = jnp.asarray(images((5, 32, 64, 3)))
  want = ref_batch(np.asarray(x), s)
  np.testing.assert_array_equal(np.asarray(jax.jit(etc.encrypt)(x, s)), want)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jax.vmap(etc.encrypt, in_axes=(0, None)))(x, s)), want)
  # vmap over stacked schedules: one key per example (e.g. attack training).
  ss = [schedule(32, 64, 16, seed=k) for k in range(5)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ss)
  got = jax.jit(jax.vmap(etc.encrypt))(x, stacked)
  for i in range(5):
    np.testing.assert_array_equal(np.asarray(got[i]), ref_batch(np.asarray(x[i]), ss[i]))
  back = jax.jit(jax.vmap(etc.decrypt))(got, stacked)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_bad_inputs():
  s = schedule(32, 32, 16)
  with pytest.raises(ValueError, match="not a multiple of the block size"):
    etc.encrypt(np.zeros((30, 32, 3), np.uint8), s)
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    etc.encrypt(np.zeros((32, 32, 4), np.uint8), s)
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    etc.encrypt(np.zeros((32, 32), np.uint8), s)
  with pytest.raises(ValueError, match="uint8"):
    etc.encrypt(np.zeros((32, 32, 3), np.int32), s)
  with pytest.raises(ValueError, match="uint8"):
    etc.decrypt(jnp.zeros((32, 32, 3), bool), s)
  with pytest.raises(ValueError, match="made for 32x32"):
    etc.encrypt(np.zeros((64, 16, 3), np.uint8), s)
  with pytest.raises(ValueError, match="schedule has 4 blocks"):
    etc.encrypt(np.zeros((64, 64, 3), np.uint8), s.replace(grid=None))
  with pytest.raises(ValueError, match="not a permutation"):
    etc.encrypt(np.zeros((32, 32, 3), np.uint8), s.replace(perm=np.array([0, 0, 1, 2])))
  with pytest.raises(ValueError, match="rotflip"):
    etc.encrypt(np.zeros((32, 32, 3), np.uint8), s.replace(rotflip=np.array([0, 8, 1, 2])))
  with pytest.raises(ValueError, match="Schedule"):
    etc.encrypt(np.zeros((32, 32, 3), np.uint8), "key")


_SHARDED = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp, warnings
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from etcjax import etc, keys
    assert jax.device_count() == 8, jax.devices()
    warnings.simplefilter("ignore")
    s = keys.EtcKey.insecure_from_seed(0).schedule(64, 32, 16)
    x = np.random.default_rng(0).integers(0, 256, (16, 64, 32, 3), dtype=np.uint8)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    xs = jax.device_put(x, data)
    ss = jax.device_put(s, repl)
    f = jax.jit(etc.encrypt, in_shardings=(data, repl), out_shardings=data)
    y = f(xs, ss)
    assert y.sharding == data
    np.testing.assert_array_equal(np.asarray(y), etc.encrypt(x, s))
    g = jax.jit(etc.decrypt, in_shardings=(data, repl), out_shardings=data)
    np.testing.assert_array_equal(np.asarray(g(y, ss)), x)
    hlo = f.lower(xs, ss).compile().as_text() + g.lower(y, ss).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter"):
      assert op not in hlo, op
    print("SHARDED-OK")
""")


def test_sharded_jit_over_8_devices_has_no_collectives():
  assert "SHARDED-OK" in run_on_fake_devices(_SHARDED)


def test_source_index_is_a_permutation_and_identity_for_identity():
  s = etc.Schedule.identity(32, 48, 16)
  idx = etc.source_index(s.perm, s.rotflip, s.chperm, (2, 3), 16, xp=np)
  np.testing.assert_array_equal(idx, np.arange(32 * 48 * 3))
  s = schedule(32, 48, 8, seed=3)
  idx = np.asarray(etc.source_index(s.perm, s.rotflip, s.chperm, (4, 6), 8))
  np.testing.assert_array_equal(np.sort(idx), np.arange(32 * 48 * 3))


def test_host_cache_keeps_schedules_apart():
  x = images((2, 32, 32, 3))
  a, b = schedule(32, 32, 16, seed=1), schedule(32, 32, 16, seed=2)
  for s in (a, b, a, b):
    np.testing.assert_array_equal(etc.encrypt(x, s), ref_batch(x, s))


def test_benchmark_script_runs(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
  import bench_etc

  out = tmp_path / "bench.json"
  assert bench_etc.main(["--batch", "4", "--size", "64", "--rounds", "1", "--loop-images", "2",
                         "--json", str(out)]) == 0
  import json

  doc = json.loads(out.read_text())
  assert doc["copy_fraction"] > 0 and doc["loop_speedup"] > 0
