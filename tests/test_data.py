"""Tests of the data sources, host pipeline and on-device augmentation (etcjax.data)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from etcjax import cli, codec, etc
from etcjax.data import augment, encrypted, pipeline, sources
from etcjax.errors import UserError
from etcjax.keys import EtcKey

# --- sources -----------------------------------------------------------------------------


def test_digits_are_coloured_32px_rgb_with_a_fixed_split():
  xtr, ytr, xte, yte = sources.digits_arrays()
  assert xtr.shape == (1437, 32, 32, 3) and xte.shape == (360, 32, 32, 3)
  assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
  assert set(np.unique(ytr)) == set(range(10)) and set(np.unique(yte)) == set(range(10))
  # Colour: the channels differ (EtC's channel shuffle has something to shuffle).
  assert np.abs(xtr[..., 0].astype(int) - xtr[..., 1]).mean() > 5
  again = sources.digits_arrays()
  np.testing.assert_array_equal(again[0], xtr)
  np.testing.assert_array_equal(again[3], yte)


def test_per_process_shards_partition_a_split():
  shards = [sources.load("digits", 32, shard=(i, 3)) for i in range(3)]
  assert sum(len(s.train) for s in shards) == 1437
  assert sum(len(s.eval) for s in shards) == 360
  full = sources.load("digits", 32)
  np.testing.assert_array_equal(shards[1].train.images(np.arange(5)),
                                full.train.images(np.arange(1, 15, 3)))
  assert sources.load("digits", 32, train=False).train is None


def write_folder(root, n_train=6, n_test=3, size=(20, 28)):
  """A 3-class folder dataset of digits images resized to `size` (h, w)."""
  xtr, ytr, xte, yte = sources.digits_arrays()
  for split, x, y, n in (("train", xtr, ytr, n_train), ("test", xte, yte, n_test)):
    for c in range(3):
      folder = root / split / f"class{c}"
      folder.mkdir(parents=True)
      for j, i in enumerate(np.flatnonzero(y == c)[:n]):
        Image.fromarray(x[i]).resize(size[::-1]).save(folder / f"{j}.png")
  return root


def test_folder_source(tmp_path):
  root = write_folder(tmp_path / "data")
  data = sources.load(f"folder:{root}", 16)
  assert data.class_names == ("class0", "class1", "class2")
  assert len(data.train) == 18 and len(data.eval) == 9
  assert data.train.images(np.arange(3)).shape == (3, 16, 16, 3)  # Resized + centre crop.
  assert data.encrypted is None
  with pytest.raises(UserError, match="no such folder"):
    sources.load(f"folder:{tmp_path / 'nope'}", 16)
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(UserError, match="test or validation or val"):
    sources.load(f"folder:{tmp_path / 'empty'}", 16)


def test_resize_center_crop_keeps_aspect():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 255  # The centre 40x40 is white.
  out = sources.resize_center_crop(image, 20)
  assert out.shape == (20, 20, 3) and out[:, 1:-1].min() > 250  # Edges: filter ringing.


def test_encrypted_folder_from_etcjax_encrypt(tmp_path):
  """Cloud mode: the folder `etcjax encrypt` writes is read with no key."""
  plain = write_folder(tmp_path / "plain", size=(32, 32))
  key_path = tmp_path / "owner.key"
  key = EtcKey.insecure_from_seed(3)
  key.save(key_path)
  assert cli.main(["encrypt", "--key", str(key_path), str(plain), "--out",
                   str(tmp_path / "enc"), "--block-size", "8"]) == 0
  data = sources.load(f"encrypted:{tmp_path / 'enc'}", 32)
  assert data.encrypted == sources.EncryptedInfo("etc", key.fingerprint, 8)
  assert data.class_names == ("class0", "class1", "class2")
  assert len(data.train) == 18 and len(data.eval) == 9
  plain_data = sources.load(f"folder:{plain}", 32)
  np.testing.assert_array_equal(
      data.train.images(np.arange(4)),
      etc.encrypt(plain_data.train.images(np.arange(4)), key.schedule(32, 32, 8)))
  # A file the manifest does not list is refused.
  Image.new("RGB", (32, 32)).save(tmp_path / "enc" / "test" / "class0" / "stray.png")
  with pytest.raises(UserError, match="stray.png is not listed"):
    sources.load(f"encrypted:{tmp_path / 'enc'}", 32)
  with pytest.raises(UserError, match="etcjax-manifest.json"):
    encrypted.read_manifest(str(plain))


def test_encrypted_jpeg_folder_decodes_without_fancy_upsampling(tmp_path):
  plain = write_folder(tmp_path / "plain", n_train=1, n_test=1, size=(32, 32))
  key_path = tmp_path / "owner.key"
  EtcKey.insecure_from_seed(4).save(key_path)
  assert cli.main(["encrypt", "--key", str(key_path), str(plain), "--out",
                   str(tmp_path / "enc"), "--format", "jpeg", "--quality", "90"]) == 0
  data = sources.load(f"encrypted:{tmp_path / 'enc'}", 32)
  blob = data.eval.blobs[0]
  np.testing.assert_array_equal(data.eval.images(np.array([0]))[0],
                                codec.decode_jpeg(blob, decoder="nofancy"))


def test_tfds_sources_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    cifar = sources.load("tfds:cifar10", 32)
    assert cifar.train.images(np.arange(6)).shape == (6, 32, 32, 3)
    assert len(cifar.eval) == 6 and cifar.num_classes == 10
    # Imagenette images vary in size: resized on host.
    nette = sources.load("tfds:imagenette", 24, shard=(1, 2))
    assert nette.train.image_shape == (24, 24, 3) and len(nette.train) == 3
    assert nette.class_names[0] == "n01440764"


def test_unknown_datasets_are_user_errors():
  with pytest.raises(UserError, match="tfds:NAME, folder:PATH, encrypted:PATH, digits"):
    sources.load("cifar10", 32)
  with pytest.raises(UserError, match="tfds:no_such_dataset_xyz") as err:
    sources.load("tfds:no_such_dataset_xyz", 32)
  # Names the paper's datasets instead of TFDS's list of every registered one.
  assert "tfds:cifar10 and tfds:imagenette" in str(err.value)
  assert "abstract_reasoning" not in str(err.value)


# --- pipeline ----------------------------------------------------------------------------


def test_train_order_is_a_pure_function_of_seed_and_step():
  order = pipeline.TrainOrder(10, 4, seed=7)
  steps = [order.indices(s) for s in range(5)]
  # Each epoch visits every example once; batches straddle epoch ends.
  flat = np.concatenate(steps)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  fresh = pipeline.TrainOrder(10, 4, seed=7)
  for s in (4, 0, 2):  # Any order of queries, no state: what resumption relies on.
    np.testing.assert_array_equal(fresh.indices(s), steps[s])
  assert not np.array_equal(pipeline.TrainOrder(10, 4, seed=8).indices(0), steps[0])


def test_process_rows_and_eval_shards_cover_everything_once():
  """On one device a process feeds every row; eval shards partition a split of any size."""
  mesh = jax.make_mesh((1,), ("data",))
  np.testing.assert_array_equal(pipeline.process_rows(mesh, 6), np.arange(6))
  data = sources.ArrayImageSet(np.zeros((1437, 1, 1, 3), np.uint8),
                               np.arange(1437, dtype=np.int32))
  for count in (1, 2, 3):
    shards = [pipeline.shard_of(data, i, count) for i in range(count)]
    assert [len(s) for s in shards] == [len(range(i, 1437, count)) for i in range(count)]
    labels = np.concatenate([s.labels for s in shards])
    assert sorted(labels.tolist()) == list(range(1437))
    np.testing.assert_array_equal(shards[-1].images(np.array([1])), data.images(
        np.array([count - 1 + count])))


def test_eval_batches_pad_with_a_mask():
  data = sources.ArrayImageSet(np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3),
                               np.arange(5, dtype=np.int32))
  batches = list(pipeline.eval_batches(data, 2, 4))
  assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False],
                                                   [False, False]]
  assert [b["label"][0] for b in batches[:3]] == [0, 2, 4]
  limited = list(pipeline.eval_batches(data, 2, 2, limit=3))
  assert limited[1]["mask"].tolist() == [True, False]


def test_prefetch_yields_in_order_and_reraises():
  assert list(pipeline.prefetch(iter(range(6)), lambda x: x * 2)) == [0, 2, 4, 6, 8, 10]

  def broken():
    yield 1
    raise UserError("bad image")

  with pytest.raises(UserError, match="bad image"):
    list(pipeline.prefetch(broken()))


def test_to_global_shards_over_the_data_axis():
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  out = pipeline.to_global({"label": np.arange(8, dtype=np.int32)}, mesh)
  assert out["label"].shape == (8,)
  assert out["label"].sharding == pipeline.data_sharding(mesh)
  np.testing.assert_array_equal(out["label"], np.arange(8))


def test_encode_jpeg_compresses_once_and_decodes_per_batch():
  x = sources.digits_arrays()[0][:5]
  data = sources.ArrayImageSet(x, np.zeros(5, np.int32))
  jpeg = pipeline.encode_jpeg(data, 90)
  assert len(jpeg) == 5 and jpeg.image_shape == (32, 32, 3)
  out = jpeg.images(np.array([4, 0]))
  assert out.shape == (2, 32, 32, 3) and np.abs(out.astype(int) - x[[4, 0]]).mean() < 8


# --- augmentation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(sources.digits_arrays()[0][:8], jnp.float32) / 255.0


def test_random_resized_crop_and_flip(images):
  keys = jax.random.split(jax.random.key(0), 8)
  out = jax.vmap(lambda k, im: augment.random_resized_crop(k, im, 24, 0.35))(keys, images)
  assert out.shape == (8, 24, 24, 3) and 0 <= float(out.min()) and float(out.max()) <= 1
  full = augment.random_resized_crop(keys[0], images[0], 32, 1.0, ratio=(1.0, 1.0))
  np.testing.assert_allclose(full, images[0], atol=1e-5)  # The whole image: unchanged.
  flips = jax.jit(jax.vmap(augment.random_flip, in_axes=(0, None)))(
      jax.random.split(jax.random.key(1), 16), images[0])
  assert any(np.array_equal(f, images[0][:, ::-1]) for f in flips)
  assert any(np.array_equal(f, images[0]) for f in flips)


def test_rand_augment_is_deterministic_per_key_and_stays_in_range(images):
  keys = jax.random.split(jax.random.key(2), 8)
  fn = jax.jit(jax.vmap(lambda k, im: augment.rand_augment(k, im, 2, 9.0)))
  out = fn(keys, images)
  assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1
  assert float(jnp.abs(out - images).mean()) > 0.01
  # An example's augmentation is a function of its own key and image only (not of the
  # batch around it, which is what lets the trainer draw it on any device layout)...
  pair = fn(keys[5:7], images[5:7])
  np.testing.assert_allclose(pair, out[5:7], atol=1e-6)
  # ...and the key matters.
  other = fn(jax.random.split(jax.random.key(3), 8), images)
  assert not np.allclose(other, out)


@pytest.mark.parametrize("name", [n for n, _ in augment.RAND_AUGMENT_OPS])
def test_each_rand_augment_op(images, name):
  i = [n for n, _ in augment.RAND_AUGMENT_OPS].index(name)
  fn = augment.RAND_AUGMENT_OPS[i][1]
  x = images[0]
  if fn is None:
    m, o = augment._affine_matrix(jnp.int32(i), 0.5, 1.0, 32, 32)
    assert not (np.allclose(m, np.eye(2)) and np.allclose(o, 0))
  else:
    y = jax.jit(fn)(x, jnp.float32(0.9), jnp.float32(1.0))
    assert y.shape == x.shape and float(jnp.abs(y - x).max()) > 0
    assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_random_erase(images):
  erase = jax.jit(augment.random_erase)
  out = erase(jax.random.key(3), images[0], 1.0)
  changed = np.any(np.asarray(out) != np.asarray(images[0]), axis=-1)
  assert 0.01 < changed.mean() < 0.4
  np.testing.assert_array_equal(erase(jax.random.key(3), images[0], 0.0), images[0])


@pytest.mark.parametrize("mixup,cutmix", [(0.5, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_mix_keeps_label_mass_and_mixes_partners(images, mixup, cutmix):
  targets = jax.nn.one_hot(jnp.arange(8), 10)
  x, t = jax.jit(augment.mix, static_argnums=(3, 4))(jax.random.key(4), images, targets,
                                                      mixup, cutmix)
  assert x.shape == images.shape
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  # Example i mixes only with its mirror 7 - i.
  assert np.count_nonzero(np.asarray(t[0])) <= 2 and float(t[0, 0] + t[0, 7]) == pytest.approx(1)
  same_x, same_t = augment.mix(jax.random.key(4), images, targets, 0.0, 0.0)
  assert same_x is images and same_t is targets


def test_resize_is_bilinear_and_a_no_op_at_size(images):
  assert augment.resize(images, 32) is images
  assert augment.resize(images, 64).shape == (8, 64, 64, 3)
