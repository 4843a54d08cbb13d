r"""ConvMixer-384/8 (patch 4, kernel 9) from scratch on Imagenette, plain or EtC.

    python -m etcjax.main --config configs/convmixer_imagenette.py:etc \
        --workdir runs/cm_in_etc --config.key_file=keys/imagenette.key

Variants: "plain" (default), "etc" (EtC, block 16 on 224x224), "jpegNN".

Recipe (`etcjax.config.convmixer_recipe`): AdamW lr 0.01, wd 0.01, triangular
schedule, batch 64, 300 epochs of Imagenette's 9,469 training images (44,385 steps),
mixup + CutMix; plain runs add RandAugment-style augmentation, random resized crops
(timm's default scale >= 0.08), flips and random erasing. EtC runs use mixup and CutMix
only.

Targets (top-1, validation set): plain 96.10 %, EtC 90.11 %; EtC + JPEG QF 85 89.17 %,
QF 80 88.91 %.
"""

from etcjax import config as config_lib

TARGETS = {"plain": 96.10, "etc": 90.11, "etc,jpeg85": 89.17, "etc,jpeg80": 88.91}


def get_config(arg: str | None = None):
  tokens = config_lib.parse_variant(arg, ("plain", "etc", "jpeg"))
  c = config_lib.convmixer_recipe(tokens, train_examples=9_469)
  c.dataset = "tfds:imagenette"
  c.image_size = 224
  c.model = "ConvMixer-384_8"
  c.crop_scale_min = 0.08
  return c
