"""Tests of the train / eval loop (etcjax.train) on tiny models and the digits dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from etcjax import config as config_lib
from etcjax import train
from etcjax.errors import KeyMismatchError, TrainingDivergedError, UserError
from etcjax.keys import EtcKey

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.dataset = "digits"
  c.image_size = 32
  c.block_size = 8
  c.model = "ConvMixer-tiny-test"
  c.batch_size = 16
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.num_eval_examples = 32
  c.learning_rate = 0.01
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("keys") / "run.key"
  EtcKey.insecure_from_seed(1).save(path)
  return str(path)


def etc_config(key_file, **overrides):
  """Researcher-mode EtC with every random stage on: crops, flips, mixup, CutMix.

  (RandAugment is left to tests/test_data.py: it is slow to compile.)
  """
  return tiny_config(encryption="etc", key_file=key_file, num_train_steps=5,
                     augment="flip_crop", mixup_alpha=0.5, cutmix_alpha=0.5,
                     label_smoothing=0.1, keep_checkpoints=2, **overrides)


@pytest.fixture(scope="module")
def etc_run(tmp_path_factory, key_file):
  """One tiny researcher-mode EtC run, shared by the tests that read its outputs."""
  workdir = tmp_path_factory.mktemp("etc_run")
  config = etc_config(key_file)
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def params_of(workdir, step):
  """Parameters saved at `step` as a flat {path: array} dict."""
  manager = train.checkpoint_manager(str(workdir))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = state["state"]
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def test_metrics_json_records_run_and_key_fingerprint_but_no_key(etc_run, key_file):
  config, workdir, result = etc_run
  doc = json.loads((workdir / "metrics.json").read_text())
  fingerprint = EtcKey.load(key_file).fingerprint
  assert doc["step"] == 5
  assert 0.0 <= doc["eval_accuracy"] <= 1.0 and np.isfinite(doc["eval_loss"])
  assert doc["key_fingerprint"] == fingerprint and doc["encryption"] == "etc"
  assert doc["config"]["key_file"] == key_file
  assert [h["step"] for h in doc["history"]] == [2, 4, 5]
  assert doc["history"][-1]["eval_examples"] == 32
  assert result["eval_accuracy"] == doc["eval_accuracy"]
  # Neither the key nor its bytes appear in anything the run wrote.
  key_hex = EtcKey.load(key_file).to_bytes().hex()
  for path in workdir.rglob("*"):
    if path.is_file():
      data = path.read_bytes()
      assert key_hex.encode() not in data and EtcKey.load(key_file).to_bytes() not in data, path
  # Saved at 2, 4 and 5 (the end); the last two are kept.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "5"]
  assert list(workdir.glob("events.out.tfevents.*"))


def test_evaluate_checkpoint_with_same_key(etc_run):
  config, workdir, result = etc_run
  out = train.evaluate(config, str(workdir))
  assert out["step"] == 5
  assert out["eval_accuracy"] == pytest.approx(result["eval_accuracy"])
  assert json.loads((workdir / "eval.json").read_text())["eval_examples"] == 32


def test_evaluate_with_another_key_is_a_key_mismatch(etc_run, tmp_path):
  config, workdir, _ = etc_run
  other = tmp_path / "other.key"
  EtcKey.insecure_from_seed(2).save(other)
  wrong = etc_config(str(other))
  with pytest.raises(KeyMismatchError, match=EtcKey.insecure_from_seed(2).fingerprint):
    train.evaluate(wrong, str(workdir))
  with pytest.raises(KeyMismatchError, match="plain images"):
    train.evaluate(tiny_config(), str(workdir))
  # Resuming training with another key is refused the same way.
  with pytest.raises(KeyMismatchError):
    train.train_and_evaluate(wrong, str(workdir))


def test_damaged_checkpoint_is_a_one_line_error(etc_run, tmp_path):
  """Files of the latest checkpoint cut short (a disk fault): a UserError naming the
  folder and what to do, not an orbax traceback; the checkpoint before it still works."""
  import shutil
  config, workdir, _ = etc_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  damaged = copy / "checkpoints" / "5"
  for f in (damaged / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(UserError, match=f"cannot restore the checkpoint {damaged} .*move it "
                     "away to resume from the checkpoint before it") as e:
    train.evaluate(config, str(copy))
  assert "\n" not in str(e.value)
  shutil.move(damaged, tmp_path / "5.damaged")
  assert train.evaluate(config, str(copy))["step"] == 4


def test_a_failed_checkpoint_write_is_a_one_line_error(tmp_path, monkeypatch):
  """What orbax raises when the disk is full (docs/reliability.md has the real run on a
  full tmpfs): one line naming the cause and the last complete checkpoint."""
  real = train.checkpoint_manager

  def failing(workdir, config=None):
    manager = real(workdir, config)
    save = manager.save

    def save_or_fail(step, *args, **kwargs):
      if step == 4:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database at "
                         "local file \"...\": Failed to write 10366 bytes to file 4: No "
                         "space left on device [os_error_code='28']")
      return save(step, *args, **kwargs)

    manager.save = save_or_fail
    return manager

  monkeypatch.setattr(train, "checkpoint_manager", failing)
  with pytest.raises(UserError, match=r"writing a checkpoint to .* failed \(ValueError: "
                     r".*No space left on device.*\); the last complete checkpoint is step "
                     r"2: make room, then run again") as e:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert "\n" not in str(e.value)


def test_evaluate_without_checkpoint(tmp_path):
  with pytest.raises(UserError, match="no checkpoint"):
    train.evaluate(tiny_config(), str(tmp_path))


def test_resume_after_interruption_is_exact(etc_run, tmp_path, monkeypatch):
  """A run interrupted after step 3 and restarted ends with the same parameters."""
  config, full_dir, full = etc_run
  real = train.make_train_step

  def interrupted(setup, tx):
    step = real(setup, tx)

    def wrapper(state, batch, cipher):
      if int(state.step) == 3:
        raise KeyboardInterrupt
      return step(state, batch, cipher)

    return wrapper

  monkeypatch.setattr(train, "make_train_step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert train.checkpoint_manager(str(tmp_path)).latest_step() == 2
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 5
  assert [h["step"] for h in result["history"]] == [2, 4, 5]
  full_params, resumed = params_of(full_dir, 5), params_of(tmp_path, 5)
  assert full_params.keys() == resumed.keys()
  for k in full_params:
    np.testing.assert_array_equal(full_params[k], resumed[k], err_msg=k)
  assert result["eval_loss"] == full["eval_loss"]
  # A finished run started again does nothing more.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["history"] == result["history"]


def test_nan_loss_stops_the_run_before_saving_it(tmp_path, monkeypatch):
  """A loss turning NaN at step 3 stops the run at the next check with a one-line error
  naming the step and the last finite loss; the checkpoint of step 2 stays the latest."""
  real = train.make_train_step

  def diverging(setup, tx):
    step = real(setup, tx)

    def wrapper(state, batch, cipher):
      new_state, metrics = step(state, batch, cipher)
      if int(state.step) == 2:  # The third step.
        metrics = {**metrics, "train_loss": metrics["train_loss"] * np.nan}
      return new_state, metrics

    return wrapper

  monkeypatch.setattr(train, "make_train_step", diverging)
  config = tiny_config(num_train_steps=6, log_every_steps=100, eval_every_steps=100,
                       checkpoint_every_steps=2)
  with pytest.raises(TrainingDivergedError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert "loss nan" in message and "at step 3 (last finite loss " in message
  assert message.split("last finite loss ")[1].split(" at step ")[1].startswith("2)")
  # Step 3 was checked before the checkpoint of step 4 could be written.
  assert train.checkpoint_manager(str(tmp_path)).latest_step() == 2


def test_gradient_accumulation_matches_one_big_batch():
  """ViT has no batch statistics: 4 micro-batches give the same update as one batch.

  Plain SGD with lr 1 and no clipping, so that the update *is* the gradient: AdamW's
  first step (about lr * sign(gradient)) and global-norm clipping would hide a gradient
  of the wrong scale (a sum of the micro-batches' instead of their mean).
  """
  from etcjax.data import pipeline
  states = []
  for accum in (1, 4):
    config = tiny_config(model="ViT-tiny-test", grad_accum_steps=accum, optimizer="sgd",
                         momentum=0.0, learning_rate=1.0, grad_clip_norm=0.0,
                         weight_decay=0.0, schedule="constant")
    setup = train.build(config)
    tx = train.make_optimizer(config)
    order = pipeline.TrainOrder(len(setup.train_images), config.batch_size, config.seed)
    batch = next(pipeline.train_batches(setup.train_images, order, 0, 1))
    init = train.init_state(setup, tx)
    before = jax.device_get(init.params)
    state, metrics = train.make_train_step(setup, tx)(
        init, pipeline.to_global(batch, setup.mesh), setup.cipher)
    update = jax.tree.map(np.subtract, jax.device_get(state.params), before)
    states.append((update, float(metrics["train_loss"]), float(metrics["grad_norm"])))
  (one, loss_one, norm_one), (acc, loss_acc, norm_acc) = states
  assert loss_one == pytest.approx(loss_acc, rel=1e-5)
  assert norm_one == pytest.approx(norm_acc, rel=1e-4) and norm_one > 0
  scale = max(float(np.abs(u).max()) for u in jax.tree.leaves(one))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               one, acc)


@pytest.mark.slow  # bfloat16 compiles slowly on CPU.
def test_bfloat16_compute_keeps_float32_params():
  from etcjax.data import pipeline
  config = tiny_config(model="ViT-tiny-test", dtype="bfloat16")
  setup = train.build(config)
  tx = train.make_optimizer(config)
  order = pipeline.TrainOrder(len(setup.train_images), config.batch_size, config.seed)
  batch = pipeline.to_global(next(pipeline.train_batches(setup.train_images, order, 0, 1)),
                             setup.mesh)
  state, metrics = train.make_train_step(setup, tx)(train.init_state(setup, tx), batch, None)
  assert np.isfinite(float(metrics["train_loss"]))
  assert {p.dtype for p in jax.tree.leaves(state.params)} == {np.dtype("float32")}


def test_cloud_mode_trains_on_an_encrypted_folder_without_a_key(tmp_path, key_file):
  """`encrypted:PATH` from `etcjax encrypt`: no key, the manifest's fingerprint recorded."""
  from test_data import write_folder

  from etcjax import cli
  plain = write_folder(tmp_path / "plain", n_train=8, n_test=4, size=(32, 32))
  assert cli.main(["encrypt", "--key", key_file, str(plain), "--out", str(tmp_path / "enc"),
                   "--block-size", "8", "--format", "jpeg", "--quality", "90"]) == 0
  cloud = tiny_config(dataset=f"encrypted:{tmp_path / 'enc'}", encryption="etc",
                      num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                      batch_size=8, num_eval_examples=0)
  result = train.train_and_evaluate(cloud, str(tmp_path / "run"))
  fingerprint = EtcKey.load(key_file).fingerprint
  assert result["key_fingerprint"] == fingerprint and result["config"]["key_file"] == ""
  assert result["history"][-1]["eval_examples"] == 12
  # The owner (researcher mode, same key, plain images) can evaluate the cloud's model...
  owner = tiny_config(dataset=f"folder:{plain}", encryption="etc", key_file=key_file,
                      batch_size=8, num_eval_examples=0)
  assert train.evaluate(owner, str(tmp_path / "run"))["eval_examples"] == 12
  # ...nobody with another key can, and a wrong key given to the cloud is caught.
  other = tmp_path / "other.key"
  EtcKey.insecure_from_seed(9).save(other)
  owner.key_file = str(other)
  with pytest.raises(KeyMismatchError):
    train.evaluate(owner, str(tmp_path / "run"))
  cloud.key_file = str(other)
  with pytest.raises(KeyMismatchError, match="is not the key of"):
    train.build(cloud)
  cloud.key_file = ""
  cloud.augment = "flip_crop"
  with pytest.raises(UserError, match="already encrypted"):
    train.build(cloud)
  cloud.augment, cloud.encryption = "none", "none"
  with pytest.raises(UserError, match="holds 'etc'-encrypted images"):
    train.build(cloud)


def test_init_from_pretrained_vit_checkpoint(tmp_path):
  """`init_from` loads a vision_transformer-layout .npz (the ImageNet-21k ViT format)."""
  from flax import traverse_util
  config = tiny_config(model="ViT-tiny-test")
  setup = train.build(config)
  source = jax.device_get(train.init_state(setup, train.make_optimizer(config)).params)
  source = jax.tree.map(lambda p: np.asarray(p) + 1.0, source)  # Unlike a fresh init.
  np.savez(tmp_path / "vit.npz", **traverse_util.flatten_dict(source, sep="/"))
  config.init_from = str(tmp_path / "vit.npz")
  state = train.init_state(train.build(config), train.make_optimizer(config))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), source)
  config.init_from = str(tmp_path / "missing.npz")
  with pytest.raises(UserError, match="missing.npz"):
    train.init_state(train.build(config), train.make_optimizer(config))


@pytest.mark.parametrize("field,value,match", [
    ("model", "ResNet-99", "ConvMixer-256_8"),
    ("dataset", "mnist", "tfds:NAME"),
    ("encryption", "rot13", "etc"),
    ("augment", "autoaugment", "randaugment"),
    ("optimizer", "lamb", "adamw"),
])
def test_bad_config_values_list_the_valid_choices(field, value, match):
  config = tiny_config()
  config[field] = value
  with pytest.raises(UserError, match=match) as e:
    train.build(config)
  assert "\n" not in str(e.value)


def test_unknown_config_option_is_named():
  config = tiny_config()
  config.batchsize = 3
  with pytest.raises(UserError, match="batchsize.*valid options: .*batch_size"):
    config_lib.validate(config)


def test_inconsistent_encryption_settings(key_file):
  with pytest.raises(UserError, match="needs config.key_file"):
    train.build(tiny_config(encryption="etc"))
  with pytest.raises(UserError, match="encryption='none'"):
    train.build(tiny_config(key_file=key_file))
  with pytest.raises(UserError, match="multiple of config.block_size"):
    train.build(tiny_config(encryption="etc", key_file=key_file, image_size=20))
  with pytest.raises(UserError, match="model_overrides"):
    train.build(tiny_config(model_overrides={"depth_typo": 2}))
  with pytest.raises(UserError, match="does not exist"):
    train.build(tiny_config(encryption="etc", key_file="/nonexistent/k.key"))


def test_jpeg_in_the_loop_researcher_mode_encrypts_on_host(key_file):
  setup = train.build(tiny_config(encryption="etc", key_file=key_file, jpeg_quality=85,
                                  image_size=32, block_size=16))
  # Encrypted and compressed once on host: nothing left to do on device.
  assert setup.cipher is None and setup.scheme == "etc"
  batch = setup.eval_images.images(np.arange(4))
  assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  with pytest.raises(UserError, match="augment='none'"):
    train.build(tiny_config(encryption="etc", key_file=key_file, jpeg_quality=85,
                            augment="flip_crop"))


def test_learning_rate_schedules():
  c = tiny_config(num_train_steps=100, learning_rate=1.0)
  c.schedule = "triangular"
  lr = train.learning_rate_schedule(c)
  assert [float(lr(s)) for s in (0, 40, 80, 100)] == pytest.approx([0, 1, 0.05, 0])
  c.schedule, c.warmup_steps = "warmup_cosine", 10
  lr = train.learning_rate_schedule(c)
  assert float(lr(0)) == 0 and float(lr(10)) == pytest.approx(1) and float(lr(100)) == 0


_EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from test_train import etc_config, params_of
from etcjax import train
from etcjax.data import pipeline
assert jax.device_count() == 8
config = etc_config(sys.argv[2])
result = train.train_and_evaluate(config, sys.argv[3])
params = params_of(sys.argv[3], 5)
# The encryption stage alone compiles to per-device work: no collectives.
setup = train.build(config)
batch = pipeline.to_global(
    {"image": setup.eval_images.images(np.arange(16))}, setup.mesh)["image"]
hlo = train.encrypt_batch(setup).lower(batch, setup.cipher).compile().as_text()
collectives = [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
               if op in hlo]
print(json.dumps({"loss": result["eval_loss"], "acc": result["eval_accuracy"],
                  "collectives": collectives,
                  "params": {k: v.tolist() for k, v in params.items()}}))
"""


@pytest.mark.slow  # about a minute on 2 cores: runs in `make test-slow`
def test_eight_devices_match_one_device(etc_run, tmp_path, key_file):
  """The same run on 8 fake CPU devices (data-parallel) matches the 1-device run."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run(
      [sys.executable, "-c", _EIGHT_DEVICES, str(Path(__file__).parent), key_file,
       str(tmp_path / "eight")], capture_output=True, text=True, env=env, cwd=ROOT,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  assert eight["collectives"] == []
  _, one_dir, one = etc_run
  assert eight["loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
  assert eight["acc"] == pytest.approx(one["eval_accuracy"])
  for k, v in params_of(one_dir, 5).items():
    np.testing.assert_allclose(np.asarray(eight["params"][k]), v, rtol=1e-4, atol=1e-5,
                               err_msg=k)
