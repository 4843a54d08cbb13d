r"""ViT-B/16 fine-tuned on CIFAR-10, plain or EtC (MaungMaung & Kiya 2022, Table II).

    python -m etcjax.main --config configs/vit_cifar10.py:etc --workdir runs/vit_c10_etc \
        --config.key_file=keys/cifar10.key --config.init_from=/path/to/ViT-B_16.npz

Variants (`get_config` argument, comma-separated): "plain" (default), "etc" (EtC
images, block 16 = patch 16; needs `key_file`), "jpegNN" (JPEG in the loop at quality
NN, Table III).

Recipe (`etcjax.config.vit_finetune_recipe`): ViT-B/16 pre-trained on ImageNet-21k
(`init_from`: google-research/vision_transformer's `imagenet21k/ViT-B_16.npz`), CIFAR-10
upscaled on device to 224x224, SGD momentum 0.9, batch 512, lr 0.03, warm-up + cosine,
clipping 1.0, 10k steps plain / 20k steps EtC. A device that cannot hold batch 512:
`--config.grad_accum_steps=N` (the optimiser still sees batches of 512).

Targets (top-1, test set): plain 99.06 %, EtC 87.89 %; EtC + JPEG QF 85 81.99 %,
QF 80 81.84 %.
"""

from etcjax import config as config_lib

TARGETS = {"plain": 99.06, "etc": 87.89, "etc,jpeg85": 81.99, "etc,jpeg80": 81.84}


def get_config(arg: str | None = None):
  c = config_lib.vit_finetune_recipe(config_lib.parse_variant(arg, ("plain", "etc", "jpeg")))
  c.dataset = "tfds:cifar10"
  return c
