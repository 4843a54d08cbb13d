r"""ViT-B/16 fine-tuned on Imagenette, plain or EtC (MaungMaung & Kiya 2022, Table II).

    python -m etcjax.main --config configs/vit_imagenette.py:etc --workdir runs/vit_in_etc \
        --config.key_file=keys/imagenette.key --config.init_from=/path/to/ViT-B_16.npz

Variants (`get_config` argument, comma-separated): "plain" (default), "etc" (EtC
images, block 16 = patch 16; needs `key_file`), "jpegNN" (JPEG in the loop at quality
NN, Table III).

Recipe (`etcjax.config.vit_finetune_recipe`): ViT-B/16 pre-trained on ImageNet-21k,
Imagenette (shorter side resized to 224, centre crop), SGD momentum 0.9, batch 512,
lr 0.03, warm-up + cosine, clipping 1.0, 10k steps plain / 20k steps EtC.

Targets (top-1, validation set): plain 99.64 %, EtC 90.62 %; EtC + JPEG QF 85 89.63 %,
QF 80 89.60 %.
"""

from etcjax import config as config_lib

TARGETS = {"plain": 99.64, "etc": 90.62, "etc,jpeg85": 89.63, "etc,jpeg80": 89.60}


def get_config(arg: str | None = None):
  c = config_lib.vit_finetune_recipe(config_lib.parse_variant(arg, ("plain", "etc", "jpeg")))
  c.dataset = "tfds:imagenette"
  return c
