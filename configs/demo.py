r"""The demo: small models on the embedded digits dataset, plain and EtC, on a CPU.

    python -m etcjax.main --config configs/demo.py:etc --workdir runs/demo_etc \
        --config.key_file=demo.key

Variants (comma-separated): "plain" (default) or "etc"; "convmixer" (default) or
"resnet"; "tiny" (a few steps, for tests).

Data: scikit-learn's handwritten digits as coloured 32x32 images
(`etcjax.data.sources.digits_arrays`; 1437 train / 360 test). EtC uses 8x8 blocks:
16 blocks per image, a key space of about 150 bits. Models: a ConvMixer with patch 4,
dim 128, depth 4, kernel 5 (isotropic, like the paper's) and a narrow ResNet-18-style
network (not isotropic: its convolutions straddle scrambled block borders), both from
scratch with AdamW and a one-cycle schedule for 12 epochs.

`python -m etcjax.demo` runs all three (ConvMixer plain / EtC, ResNet EtC) and writes a
report; expected test accuracy is in `etcjax/demo.py`.
"""

from etcjax import config as config_lib


def get_config(arg: str | None = None):
  tokens = config_lib.parse_variant(arg, ("plain", "etc", "convmixer", "resnet", "tiny"))
  c = config_lib.base_config()
  c.dataset = "digits"
  c.image_size = 32
  c.block_size = 8
  if "resnet" in tokens:
    c.model = "ResNet-tiny-test"
    c.model_overrides.stage_sizes = (2, 2, 2, 2)
    c.model_overrides.widths = (16, 32, 64, 128)
    c.model_overrides.stem_width = 16
  else:
    c.model = "ConvMixer-tiny-test"
    c.model_overrides.dim = 128
    c.model_overrides.depth = 4
    c.model_overrides.kernel_size = 5
    c.model_overrides.patch_size = 4
  c.optimizer = "adamw"
  c.learning_rate = 0.005
  c.weight_decay = 0.01
  c.schedule = "triangular"
  c.grad_clip_norm = 1.0
  c.batch_size = 64
  c.num_train_steps = 12 * 1437 // 64
  c.label_smoothing = 0.1
  c.augment = "none"
  c.log_every_steps = 20
  c.eval_every_steps = 45
  c.checkpoint_every_steps = 45
  config_lib.apply_common_variants(c, tokens)
  if "tiny" in tokens:
    c.num_train_steps = 4
    c.batch_size = 16
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.num_eval_examples = 32
  return c
