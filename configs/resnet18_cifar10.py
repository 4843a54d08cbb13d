r"""ResNet-18 (CIFAR stem) on CIFAR-10: the non-isotropic baseline, plain or encrypted.

    python -m etcjax.main --config configs/resnet18_cifar10.py:etc \
        --workdir runs/rn_c10_etc --config.key_file=keys/cifar10.key

Variants: "plain" (default), "etc" (EtC, block 16), "pe" (pixel-wise encryption of
Sirichotedumrong et al. 2019, via `etcjax.schemes`), "jpegNN".

Recipe (`etcjax.config.resnet_recipe`): the standard CIFAR ResNet training (SGD momentum
0.9, lr 0.1, weight decay 5e-4, batch 128, 200 epochs with cosine decay; random resized
crops and flips on plain images).

Targets (top-1, test set; Table II): plain 95.53 %, PE 91.33 %. The paper reports no
EtC figure for ResNet-18: block scrambling breaks its convolutional structure, which is
the point of the isotropic networks.
"""

from etcjax import config as config_lib

TARGETS = {"plain": 95.53, "pe": 91.33}


def get_config(arg: str | None = None):
  tokens = config_lib.parse_variant(arg, ("plain", "etc", "pe", "jpeg"))
  c = config_lib.resnet_recipe(tokens, train_examples=50_000)
  c.dataset = "tfds:cifar10"
  c.image_size = 32
  return c
