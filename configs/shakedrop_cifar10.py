r"""Adaptation network + Shake-PyramidNet-110 on CIFAR-10: the pre-isotropic way (Table II).

    python -m etcjax.main --config configs/shakedrop_cifar10.py:ele \
        --workdir runs/sd_c10_ele --config.key_file=keys/cifar10.key

Variants: "plain" (default: PyramidNet-110, alpha 270, ShakeDrop, 28.49 M parameters),
"le" / "ele" / "etc" (LE, ELE or EtC images with 4 x 4 blocks, behind Madono et al.'s
block-wise adaptation network, 29.31 M parameters; the paper's 62.97 M counts 33.66 M of
modules the authors' code defines but never uses, `etcjax.models.adaptnet`), "jpegNN"
(JPEG in the loop, Table III), "tanaka" (Tanaka's shared LE-AdaptNet instead of the
block-wise one) and "reduced" (PyramidNet-26, alpha 48: 0.41 M plain, 1.23 M with the
block-wise adaptation network, for CPUs).

Reference recipe (MADONOKOUKI/Block-wise-Scrambled-Image-Recognition,
`archive/proposed_cifar10_{plain,LE,EtC}.py`, the code behind Table II's rows): SGD with
Nesterov momentum 0.9, lr 0.1, weight decay 5e-4 on every parameter, batch 512 (the
loader's; its `--batch_size 128` flag is unused), MultiStepLR x 0.1 at epochs 150 and 225,
300 epochs (`--e=305` in its README); random crop 32 with padding 4 and horizontal flip of
the plain [0, 1] image (no mean/std normalisation), then encryption of the batch; loss
cross-entropy + 1e-3 L_U (L1-2 penalty of the pseudo-permutation matrix) + 0.1 L_s (total
variation of the adaptation output).

Here (`etcjax.config.shakedrop_recipe`), within what the trainer offers: SGD momentum 0.9
(no Nesterov), cosine decay from 0.1 to 0 without warm-up instead of the two steps, weight
decay on kernels only, batch 512, 300 epochs (29,296 steps), random resized crops (scale
>= 0.75) and flips before encryption; the two penalties are added to the gradients by the
model (`adaptnet.penalize`), so `train_loss` is the cross-entropy alone. Inputs are in
[-1, 1], which the first convolution + BatchNorm absorb.

Targets (top-1, test set): plain 96.70 %, LE 94.49 %, ELE 83.06 %, EtC 89.09 % (Table
II); ELE + JPEG QF 85 31.50 %, QF 80 30.51 % (Table III, "ShakeDrop (ELE)").
"""

from etcjax import config as config_lib

TARGETS = {"plain": 96.70, "le": 94.49, "ele": 83.06, "etc": 89.09,
           "ele,jpeg85": 31.50, "ele,jpeg80": 30.51}


def get_config(arg: str | None = None):
  tokens = config_lib.parse_variant(
      arg, ("plain", "le", "ele", "etc", "jpeg", "tanaka", "reduced"))
  c = config_lib.shakedrop_recipe(tokens, train_examples=50_000)
  c.dataset = "tfds:cifar10"
  c.image_size = 32
  if "reduced" in tokens:
    c.model = c.model.replace("110_270", "26_48")
  if "tanaka" in tokens and c.encryption != "none":
    c.model = c.model.replace("-BlockAdapt", "-LEAdapt")
  return c
