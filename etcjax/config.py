"""The training configuration: every field, its default, and validation at start-up.

Config files under `configs/` start from `base_config()` and change what their
experiment needs; `python -m etcjax.main --config configs/x.py:arg --config.f=v`
overrides single fields. `validate(config)` runs before anything is loaded, so a typo in
a field name or an unknown dataset / model / option fails at once with a one-line
`UserError` that lists the valid choices.

Public, stable fields (documented in the README): `dataset`, `image_size`, `model`,
`encryption`, `key_file`, `block_size`, `jpeg_quality`, `batch_size`,
`num_train_steps`, `checkpoint_every_steps`, `eval_every_steps`, `seed`. The others
tune the optimiser, augmentation and logging.
"""

from __future__ import annotations

import ml_collections

from etcjax.errors import UserError

DATASET_KINDS = ("tfds:NAME", "folder:PATH", "encrypted:PATH", "digits")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("warmup_cosine", "triangular", "constant")
AUGMENTS = ("none", "flip_crop", "randaugment")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """Returns a config with every field at its default (a tiny ConvMixer on digits)."""
  c = ml_collections.ConfigDict()
  # --- data -------------------------------------------------------------------------
  # One string: "tfds:cifar10", "tfds:imagenette", "folder:PATH" (PATH/<split>/<class>/
  # *.png|jpg), "encrypted:PATH" (a folder written by `etcjax encrypt`, read with no
  # key) or "digits" (scikit-learn's handwritten digits, shipped with the package).
  c.dataset = "digits"
  c.data_dir = ""  # TFDS data_dir; "" = TFDS's default (~/tensorflow_datasets).
  c.image_size = 32  # Model input and encryption geometry: image_size x image_size.
  c.num_eval_examples = 0  # Evaluate on the first N examples of the eval split; 0 = all.
  # folder: datasets only: keep decoded splits here, keyed by the files' contents, so a
  # restart decodes nothing (`etcjax.data.sources.decode_folder_split`); "" = off.
  c.data_cache_dir = ""
  # --- encryption ---------------------------------------------------------------------
  # "none" (plain images), "etc" (block scrambling, rotation/flip, negative-positive,
  # channel shuffle; DESIGN.md) or another scheme of etcjax.schemes ("le", "ele", "pe").
  # With a plain dataset, a scheme needs `key_file` and encrypts on device (researcher
  # mode). With dataset "encrypted:PATH" the images are
  # already encrypted (cloud mode): `encryption` must name the manifest's scheme and no
  # key is needed (a key_file given there is only checked against the manifest).
  c.encryption = "none"
  c.key_file = ""
  c.block_size = 16  # EtC block size B; image_size must be a multiple of it.
  c.jpeg_quality = 0  # JPEG in the loop (4:2:0) at this quality factor; 0 = off.
  # --- model --------------------------------------------------------------------------
  c.model = "ConvMixer-tiny-test"  # A name from etcjax.models.names().
  c.model_overrides = ml_collections.ConfigDict()  # Keyword overrides for models.create.
  c.init_from = ""  # Pretrained ViT checkpoint (.npz / .safetensors) to fine-tune; "" = none.
  c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params stay float32).
  # --- optimisation -------------------------------------------------------------------
  c.batch_size = 64  # Global batch (all processes and devices together).
  c.eval_batch_size = 0  # 0 = batch_size.
  c.grad_accum_steps = 1  # Split each batch into this many micro-batches (small devices).
  c.num_train_steps = 200
  c.optimizer = "adamw"
  c.learning_rate = 0.01
  c.momentum = 0.9  # SGD only; 0 = plain SGD.
  c.weight_decay = 0.01  # Not applied to biases and norm scales (see train.make_optimizer).
  c.schedule = "triangular"  # "warmup_cosine", "triangular" (one-cycle) or "constant".
  c.warmup_steps = 0  # warmup_cosine only.
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 = off.
  c.label_smoothing = 0.0
  # --- augmentation (on device) -------------------------------------------------------
  # Plain-image augmentation runs before encryption: "none", "flip_crop" (random
  # resized crop + horizontal flip) or "randaugment" (flip_crop + RandAugment + random
  # erasing). The paper trains EtC models with mixup and CutMix only.
  c.augment = "none"
  c.crop_scale_min = 0.35  # Smallest crop area (fraction of the image) for flip_crop.
  c.randaugment_num_ops = 2
  c.randaugment_magnitude = 9  # 0..10, timm's scale.
  c.random_erase_prob = 0.25  # randaugment only.
  c.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing; 0 = off.
  c.cutmix_alpha = 0.0  # 0 = off. With both on, each batch uses one of them (p = 0.5).
  # --- bookkeeping --------------------------------------------------------------------
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = 100  # Also evaluates at the last step.
  c.checkpoint_every_steps = 100  # Also saves at the last step.
  c.keep_checkpoints = 3
  return c


def parse_dataset(dataset: str) -> tuple[str, str]:
  """Splits a dataset string into (kind, argument): ("tfds", "cifar10"), ("digits", "")."""
  if dataset == "digits":
    return "digits", ""
  kind, sep, arg = dataset.partition(":")
  if not sep or kind not in ("tfds", "folder", "encrypted") or not arg:
    raise UserError(f"config.dataset={dataset!r} is not a dataset; valid forms: "
                    f"{', '.join(DATASET_KINDS)}")
  return kind, arg


def _choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
  if config[field] not in choices:
    raise UserError(f"config.{field}={config[field]!r} is not valid; choose one of: "
                    f"{', '.join(choices)}")


def encryption_names() -> tuple[str, ...]:
  """The encryption schemes the trainer knows (`etcjax.schemes`): "none", "etc", ..."""
  from etcjax import schemes  # Imports JAX: only when validating.
  return tuple(schemes.names())


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks field names and values; raises UserError naming the field and valid values."""
  known = base_config()
  unknown = sorted(set(config.keys()) - set(known.keys()))
  if unknown:
    raise UserError(f"unknown config option(s) {', '.join(unknown)}; valid options: "
                    f"{', '.join(sorted(known.keys()))}")
  parse_dataset(config.dataset)
  _choice(config, "encryption", encryption_names())
  _choice(config, "optimizer", OPTIMIZERS)
  _choice(config, "schedule", SCHEDULES)
  _choice(config, "augment", AUGMENTS)
  _choice(config, "dtype", DTYPES)
  from etcjax import models
  _choice(config, "model", models.names())
  positive = ("image_size", "block_size", "batch_size", "num_train_steps", "grad_accum_steps",
              "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "keep_checkpoints")
  for field in positive:
    if int(config[field]) < 1:
      raise UserError(f"config.{field}={config[field]} must be a positive integer")
  if config.image_size % config.block_size and config.encryption != "none":
    raise UserError(f"config.image_size={config.image_size} is not a multiple of "
                    f"config.block_size={config.block_size}")
  if not 0 <= config.jpeg_quality <= 100:
    raise UserError(f"config.jpeg_quality={config.jpeg_quality} must be 0 (off) or 1..100")
  if config.batch_size % config.grad_accum_steps:
    raise UserError(f"config.batch_size={config.batch_size} is not a multiple of "
                    f"config.grad_accum_steps={config.grad_accum_steps}")
  for field in ("mixup_alpha", "cutmix_alpha", "label_smoothing", "num_eval_examples",
                "eval_batch_size", "warmup_steps", "grad_clip_norm", "weight_decay"):
    if config[field] < 0:
      raise UserError(f"config.{field}={config[field]} must not be negative")
  if not 0.0 < config.crop_scale_min <= 1.0:
    raise UserError(f"config.crop_scale_min={config.crop_scale_min} must be in (0, 1]")


def parse_variant(arg: str | None, valid: tuple[str, ...]) -> set[str]:
  """Splits a config-file argument like "etc,jpeg85" into tokens; UserError if unknown.

  A token `jpegNN` (NN = quality factor) is accepted when "jpegNN" is in `valid` or
  "jpeg" is.
  """
  tokens = {t.strip() for t in (arg or "").split(",") if t.strip()}
  for t in tokens:
    ok = t in valid or ("jpeg" in valid and t.startswith("jpeg") and t[4:].isdigit())
    if not ok:
      raise UserError(f"unknown config variant {t!r}; valid: {', '.join(valid)}"
                      f"{' (jpeg as jpegNN, NN = quality)' if 'jpeg' in valid else ''}")
  return tokens


def apply_common_variants(config: ml_collections.ConfigDict, tokens: set[str]) -> None:
  """Applies the "etc" and "jpegNN" tokens every paper config shares.

  "etc": EtC images (researcher mode; set `key_file`), with the paper's EtC recipe
  (no plain-image augmentation; mixup / CutMix stay). "jpegNN": JPEG in the loop at
  quality NN (Table III: 85, 80).
  """
  if "etc" in tokens:
    config.encryption = "etc"
    config.augment = "none"
  for t in tokens:
    if t.startswith("jpeg"):
      config.jpeg_quality = int(t[4:])


def vit_finetune_recipe(tokens: set[str]) -> ml_collections.ConfigDict:
  """The paper's ViT-B/16 fine-tuning (both datasets); the caller sets `dataset`.

  ImageNet-21k ViT-B/16 (`init_from`), 224x224, block 16 = patch 16, SGD momentum 0.9,
  batch 512, lr 0.03, 500 warm-up steps then cosine decay, gradient clipping 1.0,
  10,000 steps on plain images and 20,000 on EtC images, no augmentation.
  """
  c = base_config()
  c.image_size = 224
  c.block_size = 16
  c.model = "ViT-B_16"
  # google-research/vision_transformer's gs://vit_models/imagenet21k/ViT-B_16.npz, copied
  # locally (`gcloud storage cp`); --config.init_from=PATH elsewhere, "" = from scratch.
  c.init_from = "ViT-B_16.npz"
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.learning_rate = 0.03
  c.schedule = "warmup_cosine"
  c.warmup_steps = 500
  c.grad_clip_norm = 1.0
  c.batch_size = 512
  c.num_train_steps = 20_000 if "etc" in tokens else 10_000
  c.augment = "none"
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  apply_common_variants(c, tokens)
  return c


def convmixer_recipe(tokens: set[str], train_examples: int) -> ml_collections.ConfigDict:
  """The paper's ConvMixer training from scratch (timm recipe of the ConvMixer paper).

  AdamW lr 0.01, weight decay 0.01, triangular (one-cycle) schedule, batch 64, 300
  epochs of `train_examples`, gradient clipping 1.0, label smoothing 0.1, mixup 0.5 and
  CutMix 0.5; plain images also get random resized crops, flips, RandAugment
  (rand-m9-mstd0.5) and random erasing 0.25. EtC images get mixup / CutMix only.
  """
  c = base_config()
  c.block_size = 16
  c.optimizer = "adamw"
  c.learning_rate = 0.01
  c.weight_decay = 0.01
  c.schedule = "triangular"
  c.grad_clip_norm = 1.0
  c.batch_size = 64
  c.num_train_steps = 300 * train_examples // 64
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.5
  c.cutmix_alpha = 0.5
  c.augment = "randaugment"
  c.randaugment_num_ops = 2
  c.randaugment_magnitude = 9
  c.random_erase_prob = 0.25
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  apply_common_variants(c, tokens)
  return c


def _cifar_sgd(c: ml_collections.ConfigDict, batch_size: int, epochs: int,
               train_examples: int) -> None:
  """The CIFAR CNN recipe both baselines share: SGD momentum 0.9, lr 0.1, weight decay
  5e-4, cosine decay without warm-up or clipping, random resized crops (>= 0.75) + flips."""
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.schedule = "warmup_cosine"
  c.warmup_steps = 0
  c.grad_clip_norm = 0.0
  c.batch_size = batch_size
  c.num_train_steps = epochs * train_examples // batch_size
  c.augment = "flip_crop"
  c.crop_scale_min = 0.75


def resnet_recipe(tokens: set[str], train_examples: int) -> ml_collections.ConfigDict:
  """The standard CIFAR ResNet-18 training, the paper's non-isotropic baseline.

  ResNet-18 with the CIFAR stem, SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 128,
  200 epochs of `train_examples` with cosine decay, random resized crops (scale >= 0.75)
  and flips on plain images. Tokens: "etc" (EtC, block 16), "pe" (pixel-wise encryption,
  `etcjax.schemes`), "jpegNN". Encrypted images get no plain-image augmentation.
  """
  c = base_config()
  c.block_size = 16
  c.model = "ResNet18-cifar"
  _cifar_sgd(c, batch_size=128, epochs=200, train_examples=train_examples)
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  apply_common_variants(c, tokens)
  if "pe" in tokens:
    c.encryption = "pe"
    c.augment = "none"
  return c


def demo_recipe(tokens: set[str]) -> ml_collections.ConfigDict:
  """The demo: small models on the embedded digits, plain or EtC, minutes on a CPU.

  Digits as coloured 32x32 images (`etcjax.data.sources.digits_arrays`), EtC with 8x8
  blocks (16 blocks, a key space of about 150 bits). "convmixer" (default): a ConvMixer
  with patch 4, dim 128, depth 4, kernel 5; "resnet": a narrow ResNet (one basic block per
  stage, widths 16-128), not isotropic, for contrast. AdamW, one-cycle schedule, batch 64,
  10 epochs.
  "tiny": 4 steps on 32 eval images, for tests.
  """
  c = base_config()
  c.dataset = "digits"
  c.image_size = 32
  c.block_size = 8
  if "resnet" in tokens:
    c.model = "ResNet-tiny-test"
    c.model_overrides.stage_sizes = (1, 1, 1, 1)
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
  c.num_train_steps = 10 * 1437 // 64
  c.label_smoothing = 0.1
  c.augment = "none"
  c.log_every_steps = 25
  c.eval_every_steps = 45
  c.checkpoint_every_steps = 45
  apply_common_variants(c, tokens)
  if "tiny" in tokens:
    c.num_train_steps = 4
    c.batch_size = 16
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.num_eval_examples = 32
  return c


def shakedrop_recipe(tokens: set[str], train_examples: int) -> ml_collections.ConfigDict:
  """Madono et al.'s CIFAR training of (adaptation network +) Shake-PyramidNet-110.

  The reference (MADONOKOUKI/Block-wise-Scrambled-Image-Recognition, `archive/
  proposed_cifar10_{plain,LE,EtC}.py`): SGD with Nesterov momentum 0.9, lr 0.1, weight
  decay 5e-4, batch 512, lr x 0.1 at epochs 150 and 225, 300 epochs (305 in its README);
  random crops (padding 4) and horizontal flips of the plain image, encryption after that;
  loss cross-entropy + 1e-3 L_U + 0.1 L_s (`etcjax.models.adaptnet`). Here, with what the
  trainer offers: SGD momentum 0.9 (not Nesterov), cosine decay from 0.1 without warm-up
  (not steps), weight decay on kernels only, random resized crops (scale >= 0.75) and
  flips before encryption, the penalties inside the model. Tokens: "le", "ele", "etc"
  (block 4, model "ShakePyramidNet-110_270-BlockAdapt"; none of them: plain images and
  "ShakePyramidNet-110_270"), "jpegNN".
  """
  c = base_config()
  schemes = {"le", "ele", "etc"} & tokens
  if len(schemes) > 1:
    raise UserError(f"choose one encryption of {', '.join(sorted(schemes))}")
  c.encryption = schemes.pop() if schemes else "none"
  c.block_size = 4
  c.model = "ShakePyramidNet-110_270" if c.encryption == "none" else \
      "ShakePyramidNet-110_270-BlockAdapt"
  _cifar_sgd(c, batch_size=512, epochs=300, train_examples=train_examples)
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  for t in tokens:
    if t.startswith("jpeg"):
      c.jpeg_quality = int(t[4:])
  if c.jpeg_quality and c.encryption != "none":
    # JPEG in the loop encrypts once on host, before the device could crop the plain image.
    c.augment = "none"
  return c
