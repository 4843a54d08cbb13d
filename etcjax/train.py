"""Training and evaluation on plain or EtC images: one readable loop.

    metrics = train_and_evaluate(config, workdir)   # train, evaluate, checkpoint, resume
    metrics = evaluate(config, workdir)             # evaluate the latest checkpoint

Data flow (DESIGN.md): host batches of uint8 images -> device: float [0, 1], resize to
`image_size`, plain-image augmentation, **EtC encryption** (researcher mode, vmapped per
example inside the sharded jit; no host round trip, no cross-device communication),
mixup / CutMix, model normalisation -> model.

Where the encryption happens:
  * plain dataset, `encryption="none"`: nowhere.
  * plain dataset, `encryption="etc"` (researcher mode): on device, every step, with
    the schedule derived from `key_file` (never saved or logged: only its fingerprint).
    With `jpeg_quality > 0` the images must be encrypted before compression, so both
    happen once on host at start-up, as a data owner would do before upload.
  * `dataset="encrypted:PATH"` (cloud mode): already encrypted; no key needed.

Parallelism: `jax.jit` over a 1-D mesh with axis "data"; the train state is replicated
(`P()`), batches are sharded on their leading axis (`P("data")`) and assembled from each
process's share with `jax.make_array_from_process_local_data`. The same code runs on one
CPU, one GPU, 8 fake CPU devices and multi-host TPU pods.

Exact resume: the global batch and each step's PRNG key are pure functions of
`(seed, step)` (`etcjax.data.pipeline.TrainOrder`, `jax.random.fold_in`), whatever the
number of processes and devices, so a run restarted from its last orbax checkpoint (on
the same or another slice) replays exactly the steps an uninterrupted run takes; on the
same layout it ends with bit-identical parameters (CPU), on another one equal up to the
order of float sums.

Outputs in `workdir`: `checkpoints/` (orbax; state + run metadata incl. the key
fingerprint), TensorBoard event files, `config.json` (at start) and `metrics.json`
(after every evaluation: step, eval_accuracy, eval_loss, key fingerprint, config,
history); `evaluate` writes `eval.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from etcjax import config as config_lib
from etcjax import fileio, models, preemption, xla_cpu
from etcjax.data import augment, pipeline, sources
from etcjax.errors import KeyMismatchError, TrainingDivergedError, UserError

# --------------------------------------------------------------------------------------
# State, optimiser, mesh.


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds about the model (no key material, no data state).

  Attributes:
    step: int32 scalar, completed training steps.
    params: model parameters (float32).
    batch_stats: BatchNorm statistics ({} for models without BatchNorm).
    opt_state: optax state.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the step.

  * warmup_cosine: linear warm-up over `warmup_steps` to `learning_rate`, cosine decay
    to 0 at `num_train_steps` (the paper's ViT fine-tuning).
  * triangular: the ConvMixer authors' one-cycle schedule: 0 -> lr at 2/5 of training,
    -> lr/20 at 4/5, -> 0 at the end.
  * constant.
  """
  lr, total = config.learning_rate, config.num_train_steps
  if config.schedule == "warmup_cosine":
    warmup = min(config.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
  if config.schedule == "triangular":
    xs = jnp.array([0.0, total * 2 / 5, total * 4 / 5, total])
    ys = jnp.array([0.0, lr, lr / 20.0, 0.0])
    return lambda step: jnp.interp(step, xs, ys)
  return optax.constant_schedule(lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then SGD with momentum or AdamW.

  Weight decay (decoupled, `weight_decay` x lr for AdamW, L2-style `weight_decay` x
  param added to the gradient for SGD) skips 1-D parameters: biases and norm scales.
  """
  schedule = learning_rate_schedule(config)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if config.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum or None)
    if config.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask), opt)
  else:
    opt = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, axis "data".

  The axis is of type Auto: shardings are given at the jit boundary (params `P()`,
  batches `P("data")`) and XLA propagates them inside, so per-example code (vmapped
  encryption, augmentation) needs no sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------------------
# Setup: data, encryption, model.


@dataclasses.dataclass
class Setup:
  """What a run needs, built from its config (see `build`)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  dataset: sources.Dataset
  train_images: sources.ImageSet | None  # What reaches the device for training.
  eval_images: sources.ImageSet
  cipher: Any  # Encrypts on device (researcher mode), or None.
  scheme: str  # Encryption of the images the model sees: "none", "etc", ...
  key_fingerprint: str | None  # Of the key those images were encrypted with.
  model: flax.linen.Module
  preprocess: Callable[[jax.Array], jax.Array]

  @property
  def data_identity(self) -> dict[str, Any]:
    return {"encryption": self.scheme, "key_fingerprint": self.key_fingerprint}


def _load_key(config: ml_collections.ConfigDict):
  from etcjax.keys import EtcKey
  return EtcKey.load(config.key_file)


def _make_cipher(name: str, key, size: int, block_size: int):
  from etcjax import schemes
  return schemes.make_cipher(name, key, size, size, block_size)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """Host-side resize (same method as on device), rounded back to uint8."""
  x = augment.resize(jnp.asarray(images, jnp.float32) / 255.0, size)
  return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)).astype(np.uint8)


def build(config: ml_collections.ConfigDict, *, train: bool = True) -> Setup:
  """Validates `config` and loads the data, key and model for this process.

  Raises:
    UserError: bad config, unreadable data or key, inconsistent encryption settings.
    KeyMismatchError: a key_file whose fingerprint differs from an encrypted dataset's.
  """
  config_lib.validate(config)
  kind, _ = config_lib.parse_dataset(config.dataset)
  size = config.image_size
  mesh = create_mesh()
  n_dev, n_proc = jax.device_count(), jax.process_count()
  for field in ("batch_size", "eval_batch_size"):
    b = config[field] or config.batch_size
    if b % n_dev or b % n_proc:
      raise UserError(f"config.{field}={b} must be a multiple of the number of devices "
                      f"({n_dev}) and processes ({n_proc})")
  if (config.batch_size // config.grad_accum_steps) % n_dev:
    raise UserError(f"config.batch_size / config.grad_accum_steps = "
                    f"{config.batch_size // config.grad_accum_steps} must be a multiple of "
                    f"the number of devices ({n_dev})")

  researcher = kind != "encrypted" and config.encryption != "none"
  if researcher and not config.key_file:
    raise UserError(f"config.encryption={config.encryption!r} on the plain dataset "
                    f"{config.dataset} needs config.key_file (make one with "
                    f"`etcjax keygen`), or use dataset 'encrypted:PATH'")
  if kind != "encrypted" and config.encryption == "none" and config.key_file:
    raise UserError(f"config.key_file={config.key_file!r} is set but "
                    f"config.encryption='none'; set config.encryption or clear key_file")
  # Encrypted before the device sees them: by the owner, or on host ahead of JPEG.
  if config.augment != "none" and (kind == "encrypted" or researcher and config.jpeg_quality):
    raise UserError(f"config.augment={config.augment!r} transforms plain images, but the "
                    f"images reach the trainer already encrypted ({config.dataset}"
                    f"{', JPEG' if config.jpeg_quality else ''}); use augment='none' "
                    f"(mixup / CutMix are fine)")
  if kind == "encrypted" and config.jpeg_quality:
    raise UserError(f"config.jpeg_quality={config.jpeg_quality}: images from "
                    f"{config.dataset} are used as stored; compress them with "
                    f"`etcjax encrypt` instead (set config.jpeg_quality=0)")
  key = _load_key(config) if config.key_file else None

  # Every process holds the whole train split, so that the global batch of a step is the
  # same whatever the number of processes (`etcjax.data.pipeline`); evaluation takes
  # every n-th example on process i.
  data = sources.load(config.dataset, size, shard=(0, 1),
                      data_dir=config.data_dir, train=train, cache_dir=config.data_cache_dir)
  train_images, cipher = data.train, None
  eval_images = pipeline.shard_of(data.eval, jax.process_index(), n_proc)
  scheme, fingerprint = config.encryption, key.fingerprint if key else None
  if kind == "encrypted":
    info = data.encrypted
    if config.encryption != info.scheme:
      raise UserError(f"{config.dataset} holds {info.scheme!r}-encrypted images but "
                      f"config.encryption={config.encryption!r}; set it to {info.scheme!r}")
    if info.block_size != config.block_size:
      raise UserError(f"{config.dataset} was encrypted with block size {info.block_size} "
                      f"but config.block_size={config.block_size}")
    if data.eval.image_shape[:2] != (size, size):
      raise UserError(f"{config.dataset} holds {data.eval.image_shape[0]}x"
                      f"{data.eval.image_shape[1]} images but config.image_size={size}; "
                      f"encrypted images cannot be resized")
    if key is not None and key.fingerprint != info.key_fingerprint:
      raise KeyMismatchError(f"key file {config.key_file} (fingerprint {key.fingerprint}) "
                             f"is not the key of {config.dataset} (fingerprint "
                             f"{info.key_fingerprint})")
    fingerprint = info.key_fingerprint
  elif researcher:
    cipher = _make_cipher(config.encryption, key, size, config.block_size)
  if config.jpeg_quality:
    # JPEG in the loop, once on host as an owner would: resize, encrypt (JPEG must see
    # encrypted images, so the device then has nothing left to encrypt), compress.
    host_cipher, cipher = cipher, None
    transform = lambda x: _resize_uint8(x, size)
    if host_cipher is not None:
      transform = lambda x: np.asarray(host_cipher.encrypt(_resize_uint8(x, size)))
    compress = lambda split: pipeline.encode_jpeg(split, config.jpeg_quality, transform)
    train_images = compress(train_images) if train else None
    eval_images = compress(eval_images)

  overrides = {"dtype": config.dtype, **config.model_overrides.to_dict()}
  try:
    model = models.create(config.model, data.num_classes, **overrides)
  except ValueError as e:
    raise UserError(f"config.model_overrides: {e}") from e
  if cipher is not None:
    cipher = jax.device_put(cipher, _replicated(mesh))
  return Setup(config=config, mesh=mesh, dataset=data, train_images=train_images,
               eval_images=eval_images, cipher=cipher, scheme=scheme,
               key_fingerprint=fingerprint, model=model,
               preprocess=models.preprocess(config.model))


# --------------------------------------------------------------------------------------
# Device-side functions.


def _plain_augment(config: ml_collections.ConfigDict, key: jax.Array, image: jax.Array
                   ) -> jax.Array:
  """One plain image `(h, w, 3)` in [0, 1] -> augmented `(S, S, 3)`, S = image_size."""
  k_crop, k_flip, k_ra, k_erase = jax.random.split(key, 4)
  image = augment.random_resized_crop(k_crop, image, config.image_size, config.crop_scale_min)
  image = augment.random_flip(k_flip, image)
  if config.augment == "randaugment":
    image = augment.rand_augment(k_ra, image, config.randaugment_num_ops,
                                 config.randaugment_magnitude)
    image = augment.random_erase(k_erase, image, config.random_erase_prob)
  return image


def model_inputs(setup: Setup, images: jax.Array, cipher: Any, key: jax.Array | None
                 ) -> jax.Array:
  """uint8 `(n, h, w, 3)` -> float `(n, S, S, 3)` in [0, 1], encrypted if `cipher`.

  With `key` (training) the plain-image augmentation runs before encryption.
  """
  config = setup.config
  x = images.astype(jnp.float32) / 255.0
  if key is not None and config.augment != "none":
    keys = jax.random.split(key, x.shape[0])
    x = jax.vmap(lambda k, im: _plain_augment(config, k, im))(keys, x)
  else:
    x = augment.resize(x, config.image_size)
  if cipher is not None:
    # Per example: each device encrypts its own shard, no communication.
    x = jax.vmap(cipher.encrypt)(x)
  return x


def encrypt_batch(setup: Setup) -> Callable[[jax.Array], jax.Array]:
  """A jitted uint8 batch -> encrypted model input in [0, 1] (for benchmarks, HLO checks)."""
  data = pipeline.data_sharding(setup.mesh)
  return jax.jit(lambda images, cipher: model_inputs(setup, images, cipher, None),
                 in_shardings=(data, _replicated(setup.mesh)), out_shardings=data)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Flax variables; models without BatchNorm have no batch_stats collection."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(setup: Setup, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
  """The jitted train step: (state, global batch, cipher) -> (state, metrics)."""
  config, model, mesh = setup.config, setup.model, setup.mesh
  num_classes = setup.dataset.num_classes
  step_root = jax.random.split(jax.random.key(config.seed))[1]
  lr_schedule = learning_rate_schedule(config)
  accum = config.grad_accum_steps

  def loss_fn(params, batch_stats, x, targets, rng):
    logits, updates = model.apply(_variables(params, batch_stats), x, train=True,
                                  rngs={"dropout": rng}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, updates.get("batch_stats", batch_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict, cipher: Any):
    # Every random choice of this step is a pure function of (seed, step).
    key = jax.random.fold_in(step_root, state.step)
    k_aug, k_mix, k_drop = jax.random.split(key, 3)
    x = model_inputs(setup, batch["image"], cipher, k_aug)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                  config.label_smoothing)
    x, targets = augment.mix(k_mix, x, targets, config.mixup_alpha, config.cutmix_alpha)
    x = setup.preprocess(x)
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, x, targets,
                                           k_drop)
    else:
      # Micro-batch a takes rows a, a+accum, ...: each device keeps its own rows.
      def split(t):
        t = t.reshape(t.shape[0] // accum, accum, *t.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, "data", *([None] * (t.ndim - 2)))
        return jax.lax.with_sharding_constraint(t, NamedSharding(mesh, spec))

      def micro(carry, inputs):
        grads_sum, loss_sum, batch_stats = carry
        i, xm, tm = inputs
        (loss, batch_stats), grads = grad_fn(state.params, batch_stats, xm, tm,
                                             jax.random.fold_in(k_drop, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, batch_stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, batch_stats), _ = jax.lax.scan(
          micro, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
          (jnp.arange(accum), split(x), split(targets)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": lr_schedule(state.step)}
    return new_state, metrics

  repl = _replicated(mesh)
  data = pipeline.data_sharding(mesh)
  # Donating the old state halves peak memory on accelerators; XLA:CPU cannot use it.
  donate = () if jax.default_backend() == "cpu" else (0,)
  return jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=donate, compiler_options=xla_cpu.compiler_options())


def make_eval_step(setup: Setup) -> Callable[[TrainState, dict, Any], dict]:
  """The jitted eval step: (state, batch with mask, cipher) -> summed metrics."""
  model = setup.model

  def eval_step(state: TrainState, batch: dict, cipher: Any):
    x = setup.preprocess(model_inputs(setup, batch["image"], cipher, None))
    logits = model.apply(_variables(state.params, state.batch_stats), x, train=False)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    mask = batch["mask"]
    return {"correct": jnp.sum(correct & mask), "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
            "count": jnp.sum(mask)}

  repl = _replicated(setup.mesh)
  data = pipeline.data_sharding(setup.mesh)
  return jax.jit(eval_step, in_shardings=(repl, data, repl), out_shardings=repl,
                 compiler_options=xla_cpu.compiler_options())


def _init_fn(setup: Setup, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  size = setup.config.image_size

  def init(key: jax.Array) -> TrainState:
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = setup.model.init({"params": key, "dropout": key}, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return init


def _init_key(config: ml_collections.ConfigDict) -> jax.Array:
  return jax.random.split(jax.random.key(config.seed))[0]


def init_state(setup: Setup, tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters (or `config.init_from`), replicated over the mesh."""
  config = setup.config
  repl = _replicated(setup.mesh)
  # Eagerly, not jitted: XLA compiles the unrolled initialisers of every layer slowly
  # (seconds even for tiny models), op-by-op dispatch is cached across runs. Through host
  # memory, so that every process contributes its (identical) copy to the global array.
  state = jax.device_put(jax.device_get(_init_fn(setup, tx)(_init_key(config))), repl)
  if config.init_from:
    from etcjax.models import vit
    if config.model not in vit.CONFIG_NAMES:
      raise UserError(f"config.init_from loads ViT checkpoints; config.model="
                      f"{config.model!r} is not a ViT")
    model_config = {**vit.get_config(config.model), **config.model_overrides.to_dict()}
    params = vit.load_pretrained(config.init_from, model_config, config.image_size,
                                 setup.dataset.num_classes)
    state = state.replace(params=jax.device_put(params, repl),
                          opt_state=jax.device_put(jax.device_get(tx.init(params)), repl))
  return state


def abstract_state(setup: Setup, tx: optax.GradientTransformation) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state: no compute, no memory."""
  shapes = jax.eval_shape(_init_fn(setup, tx), _init_key(setup.config))
  repl = _replicated(setup.mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


# --------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict | None = None
                       ) -> ocp.CheckpointManager:
  """orbax manager for `workdir/checkpoints`: async saves, keeps the last k."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints if config else None,
      enable_async_checkpointing=True, create=True)
  root = workdir if _is_url(workdir) else os.path.abspath(workdir)
  return ocp.CheckpointManager(os.path.join(root, "checkpoints"),
                               options=options, item_names=("state", "meta"))


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_data_identity(meta: dict[str, Any], setup: Setup, workdir: str) -> None:
  """KeyMismatchError if the checkpoint was trained on differently encrypted data."""
  want = (meta.get("encryption"), meta.get("key_fingerprint"))
  have = (setup.scheme, setup.key_fingerprint)
  if want != have:
    describe = lambda s, f: "plain images" if s == "none" else f"{s} images, key {f}"
    raise KeyMismatchError(
        f"the checkpoint in {workdir} was trained on {describe(*want)} but this run's data "
        f"are {describe(*have)}: use the same key (the fingerprints must match)")
  if meta.get("model") != setup.config.model:
    raise UserError(f"the checkpoint in {workdir} holds a {meta.get('model')} model but "
                    f"config.model={setup.config.model!r}")


# --------------------------------------------------------------------------------------
# Evaluation.


def _local_eval_plan(setup: Setup) -> tuple[int, int, int]:
  """(local batch size, local example limit, number of batches, equal on all processes)."""
  config = setup.config
  n_proc, index = jax.process_count(), jax.process_index()
  local_bs = (config.eval_batch_size or config.batch_size) // n_proc
  n_local = len(setup.eval_images)
  if config.num_eval_examples:
    # Process i holds global examples i, i + n_proc, ...; keep those below the limit.
    n_local = min(n_local, len(range(index, config.num_eval_examples, n_proc)))
  n_max = n_local
  if n_proc > 1:
    n_max = int(np.max(multihost_utils.process_allgather(np.array(n_local))))
  return local_bs, n_local, max(1, math.ceil(n_max / local_bs))


def run_eval(setup: Setup, state: TrainState, eval_step: Callable) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over the eval split (or its first N)."""
  local_bs, n_local, num_batches = _local_eval_plan(setup)
  totals = {"correct": 0, "loss": 0.0, "count": 0}
  batches = pipeline.eval_batches(setup.eval_images, local_bs, num_batches, n_local)
  for batch in pipeline.prefetch(batches, lambda b: pipeline.to_global(b, setup.mesh)):
    out = jax.device_get(eval_step(state, batch, setup.cipher))
    for k in totals:
      totals[k] += out[k].item()
  count = max(totals["count"], 1)
  return {"eval_accuracy": totals["correct"] / count, "eval_loss": totals["loss"] / count,
          "eval_examples": totals["count"]}


# --------------------------------------------------------------------------------------
# Outputs.


def config_record(config: ml_collections.ConfigDict, setup: Setup) -> dict[str, Any]:
  """The config as JSON-able dict plus the data identity: a key *path*, never a key."""
  return {"config": json.loads(config.to_json()), **setup.data_identity}


def _is_url(path: str) -> bool:
  """True for object-store paths such as gs://bucket/run (the workdir of Cloud TPU runs)."""
  return "://" in str(path)


def _makedirs(path: str) -> None:
  if _is_url(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def _write_json(path: str, doc: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    try:
      if _is_url(path):
        epath.Path(path).write_text(text)  # Objects are replaced whole: never half-written.
      else:
        fileio.write_text(path, text)
    except OSError as e:
      raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _metrics_doc(setup: Setup, history: list[dict[str, Any]]) -> dict[str, Any]:
  last = history[-1] if history else {}
  return {"step": last.get("step", 0), "eval_accuracy": last.get("eval_accuracy"),
          "eval_loss": last.get("eval_loss"), "dataset": setup.dataset.name,
          "model": setup.config.model, "history": history,
          **config_record(setup.config, setup)}


# --------------------------------------------------------------------------------------
# The loop.


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class _FiniteCheck:
  """Stops a run whose loss or gradient norm turns NaN / inf, naming the step."""

  def __init__(self, start_step: int):
    self.next_step = start_step + 1  # The step of the next metrics to check.
    self.last_finite: tuple[int, float] | None = None

  def check(self, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks consecutive steps' metrics (host values); returns them.

    Raises:
      TrainingDivergedError: a step's `train_loss` or `grad_norm` is not finite.
    """
    for m in metrics:
      loss, norm = float(m["train_loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(norm)):
        last = (f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                if self.last_finite else "no finite loss since this run (re)started")
        raise TrainingDivergedError(
            f"training diverged: loss {loss}, gradient norm {norm} at step {self.next_step} "
            f"({last}); the checkpoints are all from before it. Lower "
            f"config.learning_rate (or set config.grad_clip_norm), check the data, then "
            f"resume or start again")
      self.last_finite = (self.next_step, loss)
      self.next_step += 1
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, saves.

  Returns:
    The final metrics document (also written to `workdir/metrics.json`).

  Raises:
    UserError: bad config, data or key (before any output), an unreadable checkpoint.
    KeyMismatchError: `workdir` holds checkpoints of differently encrypted data.
    TrainingDivergedError: the loss became NaN / inf; the checkpoints hold the steps
      before it.
  """
  setup = build(config)  # Bad data / key / model settings fail here, before any output.
  _makedirs(workdir)
  logging.info("data: %s, %d train examples, %d eval examples on process %d; images seen "
               "as %s", setup.dataset.name, len(setup.train_images), len(setup.eval_images),
               jax.process_index(), setup.scheme if setup.scheme == "none"
               else f"{setup.scheme} (key fingerprint {setup.key_fingerprint})")
  tx = make_optimizer(config)
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is None:
    state, history = init_state(setup, tx), []
  else:
    state, meta = restore_checkpoint(manager, setup, workdir)
    history = meta["history"]
    logging.info("resumed from the checkpoint at step %d", int(state.step))
  _write_json(os.path.join(workdir, "config.json"), config_record(config, setup))

  train_step, eval_step = make_train_step(setup, tx), make_eval_step(setup)
  # TensorBoard event files (process 0) and "[step] name=value" log lines. Imported here:
  # clu's writers load TensorFlow, which building and timing a step does not need.
  from clu import metric_writers
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  total = config.num_train_steps
  start = int(state.step)
  # The global batch of each step, of which this process loads its devices' rows.
  order = pipeline.TrainOrder(len(setup.train_images), config.batch_size, config.seed)
  rows = pipeline.process_rows(setup.mesh, config.batch_size)
  batches = pipeline.prefetch(
      pipeline.train_batches(setup.train_images, order, start, total, rows),
      lambda b: pipeline.to_global(b, setup.mesh))
  # Per-step metrics: on device until the next log / eval / checkpoint step, then on host
  # (checked for NaN / inf) until the next log step.
  pending: list[dict[str, jax.Array]] = []
  fetched: list[dict[str, Any]] = []
  finite = _FiniteCheck(start)
  last_train_loss = None
  t_log, step_log = time.perf_counter(), start
  # SIGTERM (a preemption notice) -> every host saves at the same step and stops early.
  watch, preempted = preemption.PreemptionWatch(), False
  try:
    for step in range(start + 1, total + 1):  # `step` = steps completed after this one.
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next(batches), setup.cipher)
      pending.append(metrics)
      preempted = watch.reached(step) and step < total  # Asked every step, on every host.
      log_now = step % config.log_every_steps == 0 or step == total
      eval_now = step % config.eval_every_steps == 0 or step == total
      save_now = step % config.checkpoint_every_steps == 0 or step == total or preempted
      if log_now or eval_now or save_now:
        # Before anything is logged, evaluated or saved: a diverged run stops here, with
        # its last checkpoint from before the divergence.
        fetched += finite.check(jax.device_get(pending))
        pending = []
      if log_now:
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        fetched = []
        elapsed = max(time.perf_counter() - t_log, 1e-9)  # Includes evals and compiles.
        summary["steps_per_sec"] = (step - step_log) / elapsed
        summary["images_per_sec"] = summary["steps_per_sec"] * config.batch_size
        t_log, step_log = time.perf_counter(), step
        last_train_loss = summary["train_loss"]
        writer.write_scalars(step, summary)
        logging.info("step %d/%d (%.0f%%), %.1f images/s, ETA %s", step, total,
                     100 * step / total, summary["images_per_sec"],
                     _format_duration((total - step) / summary["steps_per_sec"]))
      if eval_now:
        result = run_eval(setup, state, eval_step)
        writer.write_scalars(step, result)
        history.append({"step": step, "train_loss": last_train_loss, **result})
        _write_json(os.path.join(workdir, "metrics.json"), _metrics_doc(setup, history))
      if save_now:
        meta = {"history": history, "model": config.model, "dataset": setup.dataset.name,
                "step": step, "class_names": list(setup.dataset.class_names),
                **config_record(config, setup)}
        try:  # Raises what went wrong with the previous (async) save, if anything.
          manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
        except Exception as e:
          raise _save_failed(manager, e) from e
      if preempted:
        break
  finally:
    watch.close()
    # Also on Ctrl-C / errors: let in-flight async saves finish, so the last checkpoint
    # is complete and a restart resumes from it.
    batches.close()
    try:
      manager.wait_until_finished()
    except Exception as e:
      raise _save_failed(manager, e) from e
    writer.flush()
  doc = {**_metrics_doc(setup, history), "preempted": preempted}
  _write_json(os.path.join(workdir, "metrics.json"), doc)
  return doc


def _save_failed(manager: ocp.CheckpointManager, error: Exception) -> UserError:
  """A one-line error for a checkpoint that could not be written (a full disk, ...).

  orbax writes a checkpoint into a temporary folder and renames it when complete, so the
  earlier checkpoints are intact and a restart resumes from the last of them.
  """
  detail = " ".join(f"{type(error).__name__}: {error}".split())
  if len(detail) > 300:  # The cause (e.g. "No space left on device") is at the end.
    detail = f"{detail[:120]} ... {detail[-170:]}"
  latest = manager.latest_step()
  return UserError(f"writing a checkpoint to {manager.directory} failed ({detail}); "
                   + (f"the last complete checkpoint is step {latest}: make room, then run "
                      f"again to resume from it" if latest is not None else
                      "no checkpoint is complete yet"))


def restore_checkpoint(manager: ocp.CheckpointManager, setup: Setup, workdir: str
                       ) -> tuple[TrainState, dict[str, Any]]:
  """The latest checkpoint's state and metadata, after checking its data identity.

  Raises:
    UserError: no checkpoint, or one of another model.
    KeyMismatchError: the checkpoint was trained on differently encrypted images.
  """
  latest = manager.latest_step()
  if latest is None:
    raise UserError(f"{workdir} holds no checkpoint (expected {workdir}/checkpoints/<step>)")
  try:
    meta = restore_meta(manager, latest)
  except Exception as e:  # orbax / tensorstore / json raise many types for damaged files.
    raise _unreadable_checkpoint(manager, latest, e) from e
  if not isinstance(meta, dict):
    raise _unreadable_checkpoint(manager, latest, ValueError("its metadata is not a dict"))
  check_data_identity(meta, setup, workdir)
  target = abstract_state(setup, make_optimizer(setup.config))
  try:
    state = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:
    raise _unreadable_checkpoint(manager, latest, e) from e
  return state, meta


def _unreadable_checkpoint(manager: ocp.CheckpointManager, step: int, error: Exception
                           ) -> UserError:
  """A one-line error for a checkpoint that orbax cannot restore."""
  folder = os.path.join(str(manager.directory), str(step))
  detail = " ".join(f"{type(error).__name__}: {error}".split())
  return UserError(f"cannot restore the checkpoint {folder} ({detail[:300]}): it is damaged "
                   f"or incomplete, or holds a model / optimizer state of other settings than "
                   f"this config; move it away to resume from the checkpoint before it, or use "
                   f"another workdir")


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir` on the config's eval split.

  Raises:
    KeyMismatchError: the data's encryption / key fingerprint differs from training's.
    UserError: no checkpoint, bad config.
  """
  setup = build(config, train=False)
  state, _ = restore_checkpoint(checkpoint_manager(workdir), setup, workdir)
  result = {"step": int(state.step), **run_eval(setup, state, make_eval_step(setup)),
            "dataset": setup.dataset.name, "model": config.model,
            **config_record(config, setup)}
  _write_json(os.path.join(workdir, "eval.json"), result)
  logging.info("eval at step %d: accuracy %.4f, loss %.4f", result["step"],
               result["eval_accuracy"], result["eval_loss"])
  return result
