"""Tests for the compiled CPU kernel of etcjax.etc (etcjax/csrc/etc_cpu.cc) and its dispatch.

Skipped, with the reason, where the kernel was not built (no C++17 compiler at install).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _runs import run_on_fake_devices
from test_etc import images, ref_batch, schedule

from etcjax import etc

pytestmark = pytest.mark.skipif(not etc.cpu_kernel_available(),
                                reason=f"CPU kernel unavailable: {etc.cpu_kernel_status()}")

TARGET = "etcjax_etc_transform_u8"


def fields(s):
  return [jnp.asarray(getattr(s, f), jnp.int32) for f in ("perm", "rotflip", "negpos", "chperm")]


def kernel(x, s, **kw):
  """The FFI call alone, jitted (no dispatch, partitioning or vmap rule)."""
  f = jax.jit(lambda x, *a: etc._kernel_call(x, *a, s.block_size, **kw))
  return np.asarray(f(x, *fields(s)))


def uses_kernel(f, *args) -> bool:
  return TARGET in jax.jit(f).lower(*args).compile().as_text()


# B = 16 and 8: SIMD rows and in-register transposes; 17, 21: SIMD rows, portable transposed
# blocks; 32: portable only; 1: single pixels.
@pytest.mark.parametrize("geom", [(32, 32, 16), (64, 48, 16), (48, 64, 8), (12, 20, 4),
                                  (8, 8, 1), (224, 224, 16), (64, 80, 2), (34, 51, 17),
                                  (42, 63, 21), (64, 96, 32)])
@pytest.mark.parametrize("simd", [True, False])
def test_kernel_matches_reference(geom, simd):
  h, w, b = geom
  s = schedule(h, w, b, seed=b)
  x = images((3, h, w, 3), seed=h)
  np.testing.assert_array_equal(kernel(x, s, simd=simd), ref_batch(x, s))


@pytest.mark.parametrize("shape", [(32, 48, 3), (2, 3, 32, 48, 3), (1, 32, 48, 3),
                                   (0, 32, 48, 3)])
def test_kernel_any_batch_shape(shape):
  s = schedule(32, 48, 16, seed=1)
  x = images(shape, seed=2)
  want = ref_batch(x, s) if x.size else x
  np.testing.assert_array_equal(kernel(x, s), want)
  np.testing.assert_array_equal(np.asarray(etc.encrypt(jnp.asarray(x), s)), want)


def test_large_batch_threads_and_streaming_stores():
  # >= 8 MiB of output: staged bands with non-temporal stores, split over the thread pool.
  s = schedule(224, 224, 16, seed=3)
  x = images((64, 224, 224, 3), seed=4)
  want = etc.encrypt(x, s)  # host NumPy path, tested against the reference in test_etc
  np.testing.assert_array_equal(kernel(x, s), want)
  np.testing.assert_array_equal(kernel(x, s, threads=1), want)
  np.testing.assert_array_equal(kernel(x[:, :, :208], schedule(224, 208, 16, seed=3)),
                                etc.encrypt(x[:, :, :208], schedule(224, 208, 16, seed=3)))


def test_encrypt_dispatches_uint8_to_the_kernel_and_floats_to_the_gather():
  s = schedule(32, 32, 16)
  x = jnp.asarray(images((2, 32, 32, 3)))
  assert uses_kernel(etc.encrypt, x, s)
  assert uses_kernel(etc.decrypt, x, s)
  assert not uses_kernel(etc.encrypt, x.astype(jnp.float32) / 255, s)


def test_other_platforms_lower_to_the_gather():
  s = schedule(32, 32, 16)
  x = jnp.asarray(images((2, 32, 32, 3)))
  traced = jax.jit(etc.encrypt).trace(x, s)
  assert TARGET in traced.lower(lowering_platforms=("cpu",)).as_text()
  for platform in ("cuda", "tpu"):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert TARGET not in text and "gather" in text


@pytest.mark.parametrize("geom", [(64, 48, 16), (48, 64, 8), (12, 20, 4)])
def test_round_trip_eager_and_jit(geom):
  h, w, b = geom
  s = schedule(h, w, b, seed=7)
  x = jnp.asarray(images((4, h, w, 3), seed=5))
  y = etc.encrypt(x, s)
  np.testing.assert_array_equal(np.asarray(y), ref_batch(np.asarray(x), s))
  np.testing.assert_array_equal(np.asarray(etc.decrypt(y, s)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(jax.jit(etc.decrypt)(jax.jit(etc.encrypt)(x, s), s)),
                                np.asarray(x))
  # Traced schedule: decrypt inverts it inside the jit.
  inv = jax.jit(lambda y, s: etc.decrypt(y, s))(y, jax.tree.map(jnp.asarray, s))
  np.testing.assert_array_equal(np.asarray(inv), np.asarray(x))


def test_vmap_over_images_uses_the_kernel():
  s = schedule(32, 48, 16, seed=1)
  x = images((2, 3, 32, 48, 3))
  want = ref_batch(x, s)
  inner = jax.vmap(etc.encrypt, in_axes=(0, None))
  nested = jax.vmap(inner, in_axes=(0, None))
  np.testing.assert_array_equal(np.asarray(nested(jnp.asarray(x), s)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(nested)(x, s)), want)
  assert uses_kernel(nested, x, s)
  axis1 = jax.vmap(etc.encrypt, in_axes=(1, None), out_axes=1)
  np.testing.assert_array_equal(np.asarray(jax.jit(axis1)(x, s)), want)
  assert uses_kernel(axis1, x, s)


def test_vmap_over_schedules_falls_back_correctly():
  ss = [schedule(32, 48, 16, seed=k) for k in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ss)
  x = images((3, 32, 48, 3), seed=3)
  got = jax.jit(jax.vmap(etc.encrypt))(x, stacked)
  one = jax.jit(jax.vmap(etc.encrypt, in_axes=(None, 0)))(x[0], stacked)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(got[i]), ref_batch(x[i], ss[i]))
    np.testing.assert_array_equal(np.asarray(one[i]), ref_batch(x[0], ss[i]))
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(etc.decrypt))(got, stacked)), x)


_SHARDED = textwrap.dedent("""
    import numpy as np, jax, warnings
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from etcjax import etc, keys
    assert jax.device_count() == 8 and etc.cpu_kernel_available()
    warnings.simplefilter("ignore")
    s = keys.EtcKey.insecure_from_seed(0).schedule(64, 32, 16)
    x = np.random.default_rng(0).integers(0, 256, (16, 64, 32, 3), dtype=np.uint8)
    collectives = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
                   "reduce-scatter")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    f = jax.jit(etc.encrypt, in_shardings=(data, repl), out_shardings=data)
    xs = jax.device_put(x, data)
    hlo = f.lower(xs, s).compile().as_text()
    assert "etcjax_etc_transform_u8" in hlo and "u8[2,64,32,3]" in hlo, hlo
    assert not [op for op in collectives if op in hlo], hlo
    y = f(xs, s)
    np.testing.assert_array_equal(np.asarray(y), etc.encrypt(x, s))
    # vmap inside the jit, and a 2-D mesh over two batch axes.
    v = jax.jit(jax.vmap(etc.decrypt, in_axes=(0, None)), in_shardings=(data, repl),
                out_shardings=data)
    hlo = v.lower(y, s).compile().as_text()
    assert "etcjax_etc_transform_u8" in hlo and not [op for op in collectives if op in hlo]
    np.testing.assert_array_equal(np.asarray(v(y, s)), x)
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    d2 = NamedSharding(mesh2, P("a", "b"))
    g = jax.jit(etc.encrypt, in_shardings=(d2, NamedSharding(mesh2, P())), out_shardings=d2)
    x5 = x.reshape(4, 4, 64, 32, 3)
    hlo = g.lower(x5, s).compile().as_text()
    assert "etcjax_etc_transform_u8" in hlo and not [op for op in collectives if op in hlo]
    np.testing.assert_array_equal(np.asarray(g(x5, s)), etc.encrypt(x5, s))
    # Sharded along H: the kernel needs whole images, gathers them, stays correct.
    dh = NamedSharding(mesh, P(None, "data"))
    h = jax.jit(etc.encrypt, in_shardings=(dh, repl))
    np.testing.assert_array_equal(np.asarray(h(jax.device_put(x, dh), s)), etc.encrypt(x, s))
    print("SHARDED-KERNEL-OK")
""")


def test_sharded_jit_runs_the_kernel_per_device_without_collectives():
  assert "SHARDED-KERNEL-OK" in run_on_fake_devices(_SHARDED, unset=("ETCJAX_ETC_KERNEL",))


@pytest.mark.parametrize("field,value,message", [
    ("perm", [0, 4, 1, 2], "perm has values outside 0..3"),
    ("perm", [-1, 0, 1, 2], "perm has values outside 0..3"),
    ("perm", [0, 0, 1, 2], "perm is not a permutation"),
    ("rotflip", [0, 8, 1, 2], "rotflip has values outside 0..7"),
    ("negpos", [0, 2, 1, 0], "negpos has values outside 0..1"),
    ("chperm", [0, 6, 1, 2], "chperm has values outside 0..5"),
])
def test_bad_schedule_is_an_error_not_a_crash(field, value, message):
  s = schedule(32, 32, 16)
  bad = jax.tree.map(jnp.asarray, s).replace(**{field: jnp.asarray(value, jnp.int32)})
  x = jnp.asarray(images((2, 32, 32, 3)))
  with pytest.raises(jax.errors.JaxRuntimeError, match=message):
    jax.jit(etc.encrypt)(x, bad).block_until_ready()


def test_bad_shapes_are_errors():
  s = schedule(32, 32, 16)
  with pytest.raises(jax.errors.JaxRuntimeError, match="not a multiple of the block size"):
    kernel(images((1, 40, 32, 3)), s)
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"expected images of shape"):
    kernel(images((1, 32, 32, 4)), s)
  with pytest.raises(jax.errors.JaxRuntimeError, match="has 4 entries, expected 8"):
    kernel(images((1, 64, 32, 3)), s)
  with pytest.raises(jax.errors.JaxRuntimeError, match="block size must be >= 1"):
    kernel(images((1, 32, 32, 3)), s.replace(block_size=0))


def test_env_var_forces_the_gather(monkeypatch):
  s = schedule(48, 64, 8, seed=2)
  x = images((2, 48, 64, 3))
  monkeypatch.setenv("ETCJAX_ETC_KERNEL", "0")
  assert not uses_kernel(lambda x, s: etc.encrypt(x, s), x, s)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, s: etc.encrypt(x, s))(x, s)),
                                ref_batch(x, s))
  monkeypatch.setenv("ETCJAX_ETC_KERNEL", "1")
  assert uses_kernel(lambda x, s: etc.encrypt(x, s), x, s)


def test_without_the_library_everything_uses_the_gather(monkeypatch):
  monkeypatch.setattr(etc, "_kernel", lambda: (None, "not built: simulated"))
  assert not etc.cpu_kernel_available()
  assert etc.cpu_kernel_status() == "not built: simulated"
  s = schedule(32, 48, 16, seed=4)
  x = images((2, 32, 48, 3))
  assert not uses_kernel(lambda x, s: etc.encrypt(x, s), x, s)
  np.testing.assert_array_equal(np.asarray(etc.encrypt(jnp.asarray(x), s)), ref_batch(x, s))


def test_a_kernel_failing_its_self_test_is_not_used(monkeypatch):
  monkeypatch.setattr(etc, "_kernel_self_test", lambda: "wrong output")
  etc._kernel.cache_clear()
  try:
    assert not etc.cpu_kernel_available()
    assert "failed its self-test (wrong output)" in etc.cpu_kernel_status()
    s = schedule(32, 32, 16)
    x = images((2, 32, 32, 3))
    assert not uses_kernel(lambda x, s: etc.encrypt(x, s), x, s)
  finally:
    monkeypatch.undo()
    etc._kernel.cache_clear()
  assert etc.cpu_kernel_available()
