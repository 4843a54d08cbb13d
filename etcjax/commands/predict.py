"""Cloud inference and key adaptation: `etcjax predict` and `etcjax adapt`.

    etcjax predict --workdir RUN INPUTS... --out predictions.csv [--top-k 5]
                   [--batch-size 64] [--json]
    etcjax adapt --workdir PLAIN_RUN --key K --out ADAPTED_RUN [--block-size B]

`predict` classifies image files with the latest checkpoint of a run (any model; no key).
A run trained on EtC images takes only EtC files written by `etcjax encrypt`: the
manifest beside them (or in a parent folder) must list each file with the run's image
size, name the run's key fingerprint and block size; anything else is refused before a
single image is classified. A plain run takes plain images, prepared as its eval
pipeline does (`folder:` runs and non-square images: shorter side resized to the image
size, centre crop; otherwise resized on device). The output (CSV: path, predicted class,
its probability, then the top-k classes and probabilities; or JSON with `--json`) is
written atomically.

`adapt` turns a plain ViT run into a run for EtC images of one key with the same logits
(`etcjax.models.adapt_to_key`): checkpoint, `config.json` and a `config.py` that
`etcjax eval --config ADAPTED_RUN/config.py --workdir ADAPTED_RUN` and `etcjax predict`
use. The key is read, never stored: the run records its fingerprint and the key file's
path. Whoever holds the adapted run *and* the plain weights can read the key schedule
back (`etcjax attack --attack model-leak`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import os
import sys
from typing import Any

import numpy as np

from etcjax import fileio
from etcjax.errors import KeyMismatchError, UserError

_CONFIG_PY = '''\
"""Config of the key-adapted run in this folder, written by `etcjax adapt`.

    etcjax eval --config {folder}/config.py --workdir {folder}

evaluates it on its dataset encrypted on the fly with `key_file`; for data the owner
encrypted, add --config.dataset=encrypted:DIR --config.key_file=''.
"""

import json
import os

import ml_collections


def get_config(arg=None):
  del arg
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f)["config"])
'''


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "predict", help="classify image files with a trained run (EtC or plain)",
      description="Classify image files with the latest checkpoint of RUN. Runs trained "
      "on EtC images take EtC files written by `etcjax encrypt` (their manifest must name "
      "the run's key fingerprint, block size and image size); plain runs take plain "
      "images. Writes a CSV (or JSON) of the predicted classes with probabilities.")
  p.add_argument("--workdir", required=True, metavar="RUN", help="a training run's folder")
  p.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files or folders")
  p.add_argument("--out", required=True, metavar="FILE", help="output file (CSV or JSON)")
  p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
  p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
  p.add_argument("--json", action="store_true", help="write JSON instead of CSV")
  p.set_defaults(func=cmd_predict)

  p = subparsers.add_parser(
      "adapt", help="adapt a plain ViT run to an EtC key (same logits on EtC images)",
      description="Transform a plain ViT run with an EtC key into a run that gives the "
      "plain model's logits on EtC images of that key (one patch embedding per block "
      "position, permuted position embeddings). Anyone holding the adapted run AND the "
      "plain weights can read the key schedule back: never publish both.")
  p.add_argument("--workdir", required=True, metavar="PLAIN_RUN", help="a plain ViT run")
  p.add_argument("--key", required=True, metavar="K", help="key file from `etcjax keygen`")
  p.add_argument("--force-key", action="store_true",
                 help="accept a key file readable by other users")
  p.add_argument("--out", required=True, metavar="ADAPTED_RUN", help="new run folder")
  p.add_argument("--block-size", type=int, default=None,
                 help="EtC block size (default: the ViT's patch size)")
  p.set_defaults(func=cmd_adapt)


# --------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class Run:
  """A run's latest checkpoint, read for inference (no optimiser state kept).

  Attributes:
    workdir: the run folder.
    step: the checkpoint's step.
    meta: the checkpoint's metadata (config, encryption, key fingerprint, ...).
    config: the run's config (`ml_collections.ConfigDict`).
    variables: Flax variables `{"params": ..., ["batch_stats": ...]}`, NumPy leaves.
    class_names: one name per logit.
  """
  workdir: str
  step: int
  meta: dict[str, Any]
  config: Any
  variables: dict[str, Any]
  class_names: tuple[str, ...]

  @property
  def encryption(self) -> str:
    return self.meta.get("encryption") or "none"

  @property
  def key_fingerprint(self) -> str | None:
    return self.meta.get("key_fingerprint")

  def model(self):
    """The run's unbound Flax module."""
    from etcjax import models
    overrides = {"dtype": self.config.dtype, **self.config.model_overrides.to_dict()}
    return models.create(self.config.model, len(self.class_names), **overrides)


def load_run(workdir: str, variables: bool = True) -> Run:
  """Reads the latest checkpoint of `workdir`: metadata, config and model variables.

  Args:
    workdir: the run folder.
    variables: also restore the model variables (False: metadata only, cheap; call
      `restore_variables` later).

  Raises:
    UserError: no such run, no checkpoint, or unreadable metadata.
  """
  import ml_collections

  from etcjax import train
  if "://" not in workdir and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"{workdir} holds no checkpoint (expected {workdir}/checkpoints/<step>; "
                    f"train one with `etcjax train`)")
  manager = train.checkpoint_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise UserError(f"{workdir} holds no checkpoint (expected {workdir}/checkpoints/<step>)")
  meta = train.restore_meta(manager, step)
  if not isinstance(meta, dict) or "config" not in meta:
    raise UserError(f"{workdir}: checkpoint {step} has no run metadata")
  config = ml_collections.ConfigDict(meta["config"])
  run = Run(workdir=workdir, step=int(step), meta=meta, config=config, variables={},
            class_names=tuple(str(c) for c in meta.get("class_names") or ()))
  if variables:
    restore_variables(run, manager)
  return run


def restore_variables(run: Run, manager: Any = None) -> Run:
  """Restores `run.variables` (NumPy leaves) and, for older runs, its class names."""
  import jax
  import orbax.checkpoint as ocp

  from etcjax import train
  manager = manager or train.checkpoint_manager(run.workdir)
  restored = manager.restore(run.step,
                             args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
  params = jax.tree.map(np.asarray, get("params"))
  batch_stats = jax.tree.map(np.asarray, get("batch_stats") or {})
  run.variables = {"params": params, "batch_stats": batch_stats} if batch_stats else \
      {"params": params}
  if not run.class_names:
    run.class_names = _class_names(run.meta, run.config, params)
  return run


def _class_names(meta: dict, config: Any, params: dict) -> tuple[str, ...]:
  """Recorded class names; for older runs the dataset's (digits, folders) or indices."""
  if meta.get("class_names"):
    return tuple(str(c) for c in meta["class_names"])
  head = params.get("head", {})
  num = int(np.shape(head["bias"])[0]) if "bias" in head else 10
  dataset = str(config.dataset)
  if dataset == "digits":
    return tuple(str(i) for i in range(10))
  if dataset.startswith(("folder:", "encrypted:")):
    root = os.path.join(dataset.partition(":")[2], "train")
    if os.path.isdir(root):
      found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
      if len(found) == num:
        return tuple(found)
  return tuple(str(i) for i in range(num))


# --------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class _Input:
  path: str
  blob: bytes | None = None
  shape: tuple[int, int] | None = None  # Manifest geometry (EtC inputs).


def _find_manifest(path: str, cache: dict) -> tuple[dict | None, str]:
  """The manifest next to `path` or in its nearest parent folder holding one."""
  from etcjax.commands import owner
  folder = os.path.dirname(os.path.abspath(path))
  while True:
    if folder not in cache:
      cache[folder] = owner.read_manifest(folder)
    parent = os.path.dirname(folder)
    if cache[folder] is not None or parent == folder:
      return cache[folder], folder
    folder = parent


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def check_etc_inputs(run: Run, paths: list[str]) -> list[_Input]:
  """Validates EtC inputs against the run (manifest, key, block and image size).

  Raises:
    KeyMismatchError: a manifest of another key.
    UserError: a file without a manifest, not listed in it, of another block or image size.
  """
  from etcjax.commands import owner
  size, block = int(run.config.image_size), int(run.config.block_size)
  cache: dict = {}
  out = []
  for path in paths:
    doc, folder = _find_manifest(path, cache)
    where = os.path.join(folder, owner.MANIFEST_NAME)
    if doc is None:
      raise UserError(f"{path}: no {owner.MANIFEST_NAME} beside it or in a parent folder; "
                      f"{run.workdir} was trained on EtC images, so it takes only files "
                      f"written by `etcjax encrypt`")
    if doc["fingerprint"] != run.key_fingerprint:
      raise KeyMismatchError(f"{where}: images were encrypted with the key of fingerprint "
                             f"{doc['fingerprint']}, but {run.workdir} was trained on EtC "
                             f"images of key {run.key_fingerprint}")
    if int(doc["block_size"]) != block:
      raise UserError(f"{where}: images were encrypted with block size {doc['block_size']}, "
                      f"but {run.workdir} was trained with block size {block}")
    entry = doc["files"].get(os.path.relpath(os.path.abspath(path), folder))
    if entry is None:
      raise UserError(f"{path} is not listed in {where}: it was not encrypted into that "
                      f"folder")
    h, w = int(entry["height"]), int(entry["width"])
    if (h, w) != (size, size):
      raise UserError(f"{path} is {h}x{w} but {run.workdir} takes {size}x{size} images; EtC "
                      f"images cannot be resized: encrypt the images at {size}x{size}")
    out.append(_Input(path, shape=(h, w)))
  return out


def _plain_inputs(run: Run, paths: list[str]) -> list[_Input]:
  cache: dict = {}
  for path in paths:
    doc, folder = _find_manifest(path, cache)
    if doc is not None:
      raise UserError(f"{path} is an EtC image (manifest in {folder}) but {run.workdir} was "
                      f"trained on plain images")
  return [_Input(p) for p in paths]


def _decode(item: _Input, run: Run) -> np.ndarray:
  """uint8 (h, w, 3) as the run's eval pipeline sees it before its device-side resize."""
  from etcjax import codec
  from etcjax.data import sources
  blob = _read(item.path)
  try:
    if item.shape is not None:
      image = sources.decode_etc_image(blob)
    else:
      image = codec.decode(blob, jpeg_decoder="pillow")
  except (ValueError, UserError) as e:
    raise UserError(f"{item.path}: {e}") from None
  if item.shape is not None:
    if image.shape[:2] != item.shape:
      raise UserError(f"{item.path} decodes to {image.shape[0]}x{image.shape[1]} but its "
                      f"manifest says {item.shape[0]}x{item.shape[1]}")
    return image
  size = int(run.config.image_size)
  h, w = image.shape[:2]
  if str(run.config.dataset).startswith("folder:") or h != w:
    image = sources.resize_center_crop(image, size)  # What folder runs do on host.
  return image


# --------------------------------------------------------------------------------------
# Prediction.


def predict_probabilities(run: Run, images: list[np.ndarray], batch_size: int = 64,
                          progress: bool = True) -> np.ndarray:
  """Softmax probabilities, float32 `(len(images), num_classes)`.

  Args:
    run: the run (`load_run`).
    images: uint8 `(h, w, 3)` each, as `_decode` prepares them (EtC images unchanged).
    batch_size: images per jitted call (the last batch is padded: one compile per shape).
  """
  import jax
  overrides = json.dumps(run.config.model_overrides.to_dict(), sort_keys=True)
  probs = _probabilities_fn(run.config.model, len(run.class_names), str(run.config.dtype),
                            overrides, int(run.config.image_size))
  variables = jax.device_put(run.variables)
  out = np.zeros((len(images), len(run.class_names)), np.float32)
  groups: dict[tuple, list[int]] = {}
  for i, im in enumerate(images):
    groups.setdefault(im.shape, []).append(i)
  bar = _progress(len(images), progress)
  for shape, idx in groups.items():
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      batch = np.zeros((min(batch_size, len(idx)), *shape), np.uint8)
      batch[:len(chunk)] = np.stack([images[i] for i in chunk])
      out[chunk] = np.asarray(probs(variables, batch))[:len(chunk)]
      bar.update(len(chunk))
  bar.close()
  return out


@functools.lru_cache(maxsize=8)
def _probabilities_fn(name: str, num_classes: int, dtype: str, overrides: str, size: int):
  """The jitted (variables, uint8 batch) -> softmax probabilities of one model (cached, so
  repeated predictions in one process compile once)."""
  import jax
  import jax.numpy as jnp

  from etcjax import models
  from etcjax.data import augment
  model = models.create(name, num_classes, **{"dtype": dtype, **json.loads(overrides)})
  preprocess = models.preprocess(name)

  @jax.jit
  def probs(variables, batch):
    x = augment.resize(batch.astype(jnp.float32) / 255.0, size)
    logits = model.apply(variables, preprocess(x), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return probs


def _progress(total: int, enabled: bool):
  from tqdm import tqdm
  # disable=None: a bar on a terminal only; none for short inputs.
  return tqdm(total=total, desc="predict", unit="img", file=sys.stderr,
              disable=None if enabled and total > 64 else True)


def cmd_predict(args: argparse.Namespace) -> int:
  from etcjax.commands import owner
  if args.top_k < 1:
    raise UserError(f"--top-k must be >= 1, got {args.top_k}")
  if args.batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise UserError(f"--out {args.out}: folder {out_dir} does not exist")
  paths = [it.src for it in owner.collect_inputs(args.inputs)
           if os.path.basename(it.src) != owner.MANIFEST_NAME]
  run = load_run(args.workdir, variables=False)  # Inputs are checked before the weights load.
  if run.encryption == "etc":
    items = check_etc_inputs(run, paths)
  elif run.encryption == "none":
    items = _plain_inputs(run, paths)
  else:
    raise UserError(f"{args.workdir} was trained on {run.encryption!r}-encrypted images; "
                    f"predict reads plain images or EtC files written by `etcjax encrypt`")
  images = [_decode(it, run) for it in items]
  restore_variables(run)
  probs = predict_probabilities(run, images, args.batch_size)
  k = min(args.top_k, probs.shape[1])
  top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  names = run.class_names
  if args.json:
    doc = {"workdir": run.workdir, "step": run.step, "model": run.config.model,
           "encryption": run.encryption, "key_fingerprint": run.key_fingerprint,
           "class_names": list(names), "predictions": [
               {"path": it.path, "prediction": names[t[0]], "label": int(t[0]),
                "probability": float(p[t[0]]),
                "top_k": [{"class": names[j], "probability": float(p[j])} for j in t]}
               for it, p, t in zip(items, probs, top, strict=True)]}
    text = json.dumps(doc, indent=1) + "\n"
  else:
    buf = io.StringIO()
    wr = csv.writer(buf)
    header = ["path", "prediction", "probability"]
    for j in range(1, k + 1):
      header += [f"class_{j}", f"prob_{j}"]
    wr.writerow(header)
    for it, p, t in zip(items, probs, top, strict=True):
      row = [it.path, names[t[0]], f"{p[t[0]]:.6f}"]
      for j in t:
        row += [names[j], f"{p[j]:.6f}"]
      wr.writerow(row)
    text = buf.getvalue()
  try:
    fileio.write_text(args.out, text)
  except OSError as e:
    raise UserError(f"{args.out}: cannot write ({e.strerror or e})") from None
  print(f"predicted {len(items)} image(s) with {run.config.model} (step {run.step}, "
        f"{'plain' if run.encryption == 'none' else 'EtC key ' + str(run.key_fingerprint)}"
        f" images); wrote {args.out}")
  return 0


# --------------------------------------------------------------------------------------
# Adaptation.


def cmd_adapt(args: argparse.Namespace) -> int:
  import warnings

  from etcjax import keys
  from etcjax.models import adapt, vit
  run = load_run(args.workdir, variables=False)
  name = run.config.model
  why = adapt.no_exact_adaptation_reason(name)
  if why is not None:
    raise UserError(f"{args.workdir} holds a {name} model, which cannot be adapted to an EtC "
                    f"key exactly: {why}")
  if run.encryption != "none":
    raise UserError(f"{args.workdir} was trained on {run.encryption} images (key "
                    f"{run.key_fingerprint}); adapt a run trained on plain images")
  if os.path.exists(os.path.join(args.out, "checkpoints")):
    raise UserError(f"{args.out} already holds a run; choose another --out")
  overrides = run.config.model_overrides.to_dict()
  patch = int(dict(vit.get_config(name), **overrides)["patch_size"])
  block = patch if args.block_size is None else args.block_size
  size = int(run.config.image_size)
  if block < 1 or size % block:
    raise UserError(f"--block-size {block}: the run's image size {size} is not a multiple "
                    f"of it")
  key = keys.EtcKey.load(args.key, force=args.force_key)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    schedule = key.schedule(size, size, block)
  if keys.keyspace_bits(size, size, block) < keys.MIN_KEYSPACE_BITS:
    print(f"etcjax: warning: {keys.keyspace_message(size, size, block)}", file=sys.stderr)
  restore_variables(run)
  try:
    _, variables = adapt.adapt_to_key(name, run.variables, schedule,
                                      num_classes=len(run.class_names), **overrides)
  except ValueError as e:
    raise UserError(str(e)) from None
  new_name = adapt.adapted_name(name, variables)
  config = run.config.copy_and_resolve_references()
  config.model = new_name
  config.encryption = "etc"
  config.block_size = block
  config.key_file = os.path.abspath(args.key)
  config.augment = "none"
  config.jpeg_quality = 0
  config.init_from = ""
  record = {"config": json.loads(config.to_json()), "encryption": "etc",
            "key_fingerprint": key.fingerprint}
  meta = {"history": [], "model": new_name, "dataset": run.meta.get("dataset"),
          "step": run.step, "class_names": list(run.class_names), **record,
          "adapted_from": {"workdir": os.path.abspath(args.workdir), "model": name,
                           "step": run.step}}
  _save_run(args.out, config, variables["params"], run.step, meta)
  fileio.write_text(os.path.join(args.out, "config.json"),
                    json.dumps(record, indent=2, sort_keys=True) + "\n")
  fileio.write_text(os.path.join(args.out, "config.py"),
                    _CONFIG_PY.format(folder=args.out))
  kind = ("one patch embedding (block-shared key)" if new_name == name
          else "one patch embedding per block position")
  print(f"adapted {name} (step {run.step}) to key {key.fingerprint}, block size {block}: "
        f"{kind}; wrote {args.out} (model {new_name}). Never publish it together with the plain "
        f"weights: they give the key schedule away.")
  return 0


def _save_run(out: str, config: Any, params: dict, step: int, meta: dict) -> None:
  """Writes a training checkpoint (fresh optimiser state) that `etcjax eval` restores."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from etcjax import train
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out}: {e.strerror or e}") from None
  params = jax.tree.map(jnp.asarray, params)
  tx = train.make_optimizer(config)
  state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params))
  manager = train.checkpoint_manager(out, config)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()


# --------------------------------------------------------------------------------------
# The model-leak attack (`etcjax attack --attack model-leak`).


def cmd_model_leak(args: argparse.Namespace) -> int:
  """Recovers the key schedule of an adapted run from it and its plain parent; writes
  `summary.json` with the fraction recovered at each weight-noise level (never the key)."""
  import warnings

  from etcjax import keys
  from etcjax.attacks import model_leak
  if args.inputs:
    raise UserError("--attack model-leak reads models, not images: pass --adapted RUN and "
                    "--plain RUN instead of INPUTS")
  if not args.adapted or not args.plain:
    raise UserError("--attack model-leak needs --adapted RUN (from `etcjax adapt`) and "
                    "--plain RUN (the plain weights it came from)")
  if args.scheme != "etc":
    raise UserError("--attack model-leak reads EtC keys: use --scheme etc")
  if not args.key:
    raise UserError("--attack model-leak scores the recovered schedule against the key the "
                    "model was adapted with: pass --key K")
  try:
    levels = [float(v) for v in str(args.noise).split(",") if v.strip()]
  except ValueError:
    raise UserError(f"--noise {args.noise!r}: expected comma-separated numbers") from None
  if not levels or min(levels) < 0:
    raise UserError(f"--noise {args.noise!r}: expected numbers >= 0")
  adapted, plain = load_run(args.adapted), load_run(args.plain)
  if adapted.encryption != "etc":
    raise UserError(f"{args.adapted} was not adapted to an EtC key (it sees "
                    f"{adapted.encryption} images)")
  key = keys.EtcKey.load(args.key, force=args.force_key)
  if key.fingerprint != adapted.key_fingerprint:
    raise KeyMismatchError(f"{args.key} (fingerprint {key.fingerprint}) is not the key of "
                           f"{args.adapted} (fingerprint {adapted.key_fingerprint})")
  size, block = int(adapted.config.image_size), int(adapted.config.block_size)
  patch = int(np.shape(plain.variables["params"]["embedding"]["kernel"])[0])
  if block != patch:
    raise UserError(f"model-leak covers block size = patch size; {args.adapted} uses block "
                    f"size {block} with patch size {patch}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    truth = key.schedule(size, size, block)
  results = []
  for level in levels:
    params = model_leak.perturb(adapted.variables["params"], level, seed=args.seed)
    try:
      rec = model_leak.recover(params, plain.variables["params"], truth.grid)
    except ValueError as e:
      raise UserError(f"{args.adapted} and {args.plain} do not fit together: {e}") from None
    relative = model_leak.score_relative(model_leak.relative_states(params), truth)
    results.append({"noise": level, **model_leak.score(rec.schedule, truth),
                    "min_state_margin": float(np.min(rec.state_margin)),
                    "relative_state_fraction_without_plain": relative})
    r = results[-1]
    print(f"model-leak, weight noise {level:g}x: {r['block_fraction']:.1%} of blocks fully "
          f"recovered (perm {r['perm_fraction']:.1%}, rotflip {r['rotflip_fraction']:.1%}, "
          f"negpos {r['negpos_fraction']:.1%}, chperm {r['chperm_fraction']:.1%})"
          f"{'; exact key schedule' if r['exact'] else ''}; without the plain weights, "
          f"{relative:.1%} of block states up to one global state")
  summary = {"attack": "model-leak", "scheme": "etc", "key_fingerprint": key.fingerprint,
             "adapted": {"workdir": args.adapted, "model": adapted.config.model,
                         "step": adapted.step},
             "plain": {"workdir": args.plain, "model": plain.config.model, "step": plain.step},
             "height": size, "width": size, "block_size": block,
             "keyspace": keys.keyspace_message(size, size, block), "seed": args.seed,
             "results": results}
  try:
    os.makedirs(args.out, exist_ok=True)
    fileio.write_text(os.path.join(args.out, "summary.json"),
                      json.dumps(summary, indent=1, allow_nan=False) + "\n")
  except OSError as e:
    raise UserError(f"{args.out}: cannot write ({e.strerror or e})") from None
  print(f"wrote {os.path.join(args.out, 'summary.json')}")
  return 0
