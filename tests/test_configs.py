"""Every config file: it loads, validates, states the paper's targets, and trains.

The training checks run one or two steps of every config and variant with TFDS mock data
and the tiny model of the same family, on 1 device in-process and on 8 fake CPU devices
in a subprocess, and compare the two (slow: a compile per config).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etcjax import config as config_lib
from etcjax.errors import UserError
from etcjax.keys import EtcKey

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# (config file, variant argument) for every setup the configs describe.
SETUPS = [
    ("vit_cifar10", "plain"), ("vit_cifar10", "etc"), ("vit_cifar10", "etc,jpeg85"),
    ("vit_imagenette", "plain"), ("vit_imagenette", "etc"),
    ("convmixer_cifar10", "plain"), ("convmixer_cifar10", "etc"),
    ("convmixer_cifar10", "etc,jpeg80"),
    ("convmixer_imagenette", "plain"), ("convmixer_imagenette", "etc"),
    ("resnet18_cifar10", "plain"), ("resnet18_cifar10", "etc"), ("resnet18_cifar10", "pe"),
    ("shakedrop_cifar10", "plain"),
    ("shakedrop_cifar10", "etc,jpeg80"),
    ("demo", "plain"), ("demo", "etc"), ("demo", "etc,resnet"), ("demo", "etc,tiny"),
]
TINY_MODELS = {"ViT": "ViT-tiny-test", "ConvMixer": "ConvMixer-tiny-test",
               "ResNet": "ResNet-tiny-test",
               "ShakePyramidNet-110_270-BlockAdapt": "ShakePyramidNet-tiny-test-BlockAdapt",
               "ShakePyramidNet": "ShakePyramidNet-tiny-test"}


def load_module(name: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_file_is_covered():
  assert {p.stem for p in CONFIG_DIR.glob("*.py")} == {name for name, _ in SETUPS}


@pytest.mark.parametrize("name,arg", SETUPS)
def test_config_validates(name, arg):
  config = load_module(name).get_config(arg)
  config_lib.validate(config)
  assert ("etc" in arg) == (config.encryption == "etc")
  if config.encryption != "none" and name != "shakedrop_cifar10":
    # The paper's EtC recipe: no plain-image augmentation. (Madono et al.'s adaptation
    # networks, the ShakeDrop rows, train on crops and flips encrypted afterwards.)
    assert config.augment == "none"


@pytest.mark.parametrize("name", sorted({n for n, _ in SETUPS} - {"demo"}))
def test_paper_targets_are_in_the_docstring(name):
  module = load_module(name)
  assert module.TARGETS
  for target in module.TARGETS.values():
    assert f"{target:.2f}" in module.__doc__


def test_paper_recipes():
  vit = load_module("vit_imagenette")
  assert vit.get_config("plain").num_train_steps == 10_000
  etc_vit = vit.get_config("etc")
  assert (etc_vit.num_train_steps, etc_vit.batch_size, etc_vit.learning_rate) == (20_000, 512,
                                                                                   0.03)
  assert (etc_vit.optimizer, etc_vit.schedule, etc_vit.block_size) == ("sgd", "warmup_cosine",
                                                                       16)
  cm = load_module("convmixer_cifar10").get_config("etc")
  assert (cm.model, cm.batch_size, cm.optimizer, cm.schedule) == ("ConvMixer-256_8", 64,
                                                                  "adamw", "triangular")
  assert cm.num_train_steps == 300 * 50_000 // 64
  assert load_module("convmixer_imagenette").get_config("plain").augment == "randaugment"
  assert load_module("convmixer_cifar10").get_config("etc,jpeg85").jpeg_quality == 85


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(UserError, match="unknown config variant 'etcc'; valid: plain, etc"):
    load_module("vit_cifar10").get_config("etcc")


def tiny_version(config, key_file: str):
  """The config with the tiny model of its family, small images and a few steps."""
  family = next(f for f in TINY_MODELS if config.model.startswith(f))
  config.model = TINY_MODELS[family]
  config.model_overrides = {}
  config.init_from = ""
  config.image_size = 32
  config.block_size = min(config.block_size, 16)
  config.batch_size = 16
  config.eval_batch_size = 8
  config.grad_accum_steps = 2 if family == "ViT" else 1
  config.num_train_steps = 2
  config.num_eval_examples = 8
  config.warmup_steps = min(config.warmup_steps, 1)
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    config[field] = 2
  if config.encryption != "none":
    config.key_file = key_file
  return config


def run_setups(tmp: Path, key_file: str) -> dict[str, dict]:
  """Trains every setup for 2 steps on TFDS mock data; returns {setup: metrics}."""
  import tensorflow_datasets as tfds

  from etcjax import train
  results = {}
  with tfds.testing.mock_data(num_examples=16):
    for name, arg in SETUPS:
      config = tiny_version(load_module(name).get_config(arg), key_file)
      result = train.train_and_evaluate(config, str(tmp / f"{name}-{arg}"))
      results[f"{name}:{arg}"] = {"loss": result["eval_loss"], "step": result["step"]}
  return results


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("keys") / "k.key"
  EtcKey.insecure_from_seed(11).save(path)
  return str(path)


@pytest.mark.slow
def test_every_config_trains_on_one_and_eight_devices(tmp_path, key_file):
  script = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from pathlib import Path; from test_configs import run_setups; "
            f"print(json.dumps(run_setups(Path({str(tmp_path / 'eight')!r}), {key_file!r})))")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  one = run_setups(tmp_path / "one", key_file)
  out, err = proc.communicate(timeout=1800)
  assert proc.returncode == 0, err[-3000:]
  eight = json.loads(out.strip().splitlines()[-1])
  assert one.keys() == eight.keys() == {f"{n}:{a}" for n, a in SETUPS}
  for setup, result in one.items():
    assert result["step"] == eight[setup]["step"] == 2
    assert eight[setup]["loss"] == pytest.approx(result["loss"], rel=1e-3), setup
