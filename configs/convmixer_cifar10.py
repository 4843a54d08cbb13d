r"""ConvMixer-256/8 (patch 1, kernel 9) from scratch on CIFAR-10, plain or EtC.

    python -m etcjax.main --config configs/convmixer_cifar10.py:etc \
        --workdir runs/cm_c10_etc --config.key_file=keys/cifar10.key

Variants: "plain" (default), "etc" (EtC, block 16 on 32x32: 4 blocks, a small key
space that the tools warn about, as in the paper), "jpegNN".

Recipe (`etcjax.config.convmixer_recipe`): AdamW lr 0.01, wd 0.01, triangular
schedule, batch 64, 300 epochs (234,375 steps), mixup + CutMix; plain runs add
RandAugment-style augmentation, random resized crops (scale >= 0.75, as in the ConvMixer
CIFAR-10 script), flips and random erasing. EtC runs use mixup and CutMix only.

Targets (top-1, test set): plain 96.07 %, EtC 92.72 %; EtC + JPEG QF 85 90.43 %,
QF 80 89.95 %.
"""

from etcjax import config as config_lib

TARGETS = {"plain": 96.07, "etc": 92.72, "etc,jpeg85": 90.43, "etc,jpeg80": 89.95}


def get_config(arg: str | None = None):
  tokens = config_lib.parse_variant(arg, ("plain", "etc", "jpeg"))
  c = config_lib.convmixer_recipe(tokens, train_examples=50_000)
  c.dataset = "tfds:cifar10"
  c.image_size = 32
  c.model = "ConvMixer-256_8"
  c.crop_scale_min = 0.75
  return c
