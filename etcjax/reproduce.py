r"""Reproduce the paper's CIFAR-10 tables on real data, side by side with its figures.

    python -m etcjax.reproduce --data DIR --budget cpu --out results/cifar10-cpu
    python -m etcjax.reproduce --data DIR --budget paper --rows convmixer --out OUT
    python -m etcjax.reproduce --data DIR --budget paper --rows vit --init-from ViT-B_16.npz \
        --out OUT
    etcjax reproduce ...                                   # the same

DIR is CIFAR-10 as image folders, `DIR/train/<class>/*` and `DIR/test/<class>/*` with the
ten CIFAR-10 class names. Rows (`--rows`, comma-separated row ids or groups):

  Table II   convmixer-plain, convmixer-etc          ConvMixer-256/8 (96.07 / 92.72 %)
             vit-plain, vit-etc                      ViT-B/16 from ImageNet-21k (99.06 / 87.89 %)
             resnet18-plain, resnet18-pe, resnet18-etc
                                                     ResNet-18 (95.53 / 91.33 % / not in the
                                                     paper: the non-isotropic contrast)
             shakedrop-plain, shakedrop-le, shakedrop-ele, shakedrop-etc
                                                     adaptation network + PyramidNet-ShakeDrop
  Table III  convmixer-etc-jpeg85, convmixer-etc-jpeg80, vit-etc-jpeg85, vit-etc-jpeg80,
             shakedrop-ele-jpeg85, shakedrop-ele-jpeg80   (JPEG in the loop, 4:2:0)
  Table IV   sizes: plain vs EtC file sizes of all images under JPEG QF 85 / 80, JPEG-LS,
             JPEG 2000, PNG and uncompressed (`etcjax.codec.size_table`).

Groups: convmixer, vit, resnet, shakedrop, table2, table3, table4, all (default). A row
that cannot run here is listed with the reason, never dropped: ViT rows without
`--init-from`, ShakeDrop rows while their models are not registered.

Budgets (`BUDGETS`): `paper` (the recipes of `etcjax.config`, as in `configs/`), `gpu`
(the real ConvMixer-256/8 for as many epochs as one ~15-minute GPU lease holds for plain
and EtC), `cpu` (smaller models and short schedules so that every runnable row finishes
in about 90 minutes on a 2-core CPU) and `smoke` (a few steps per row, for tests). The
reduced budgets change plain and encrypted rows of a model in the same way, so the
plain-to-encrypted drop of each model stays comparable; `docs/reproduction.md` says why.

Outputs in OUT: `results.json` (per row: table, model, scheme, JPEG quality, budget,
epochs, steps, top-1, the paper's figure and the difference, wall time, device, JAX
version, commit, key fingerprint), `results.md` (side by side with the paper),
`curves.png` (test accuracy against epochs), `owner.key` (mode 0600, made on the first
run unless `--key` is given; never logged), `cache/` (decoded images, keyed by the files'
contents) and `runs/<row>/`, an ordinary run directory per row. Started again after a
kill, a reproduction skips finished rows and resumes each unfinished one from its last
checkpoint (saved every epoch), exactly as `etcjax.train` resumes any run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from etcjax import fileio
from etcjax.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
BUDGETS = ("paper", "gpu", "cpu", "smoke")
RESULTS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the paper's Tables II / III.

  Attributes:
    id: row id, e.g. "convmixer-etc-jpeg85".
    table: "II" or "III".
    group: "convmixer", "vit", "resnet" or "shakedrop".
    model: the model as the paper names it.
    scheme: "none", "etc", "pe", "le" or "ele".
    jpeg_quality: JPEG quality factor in the loop; 0 = uncompressed.
    paper: the paper's CIFAR-10 top-1 in %, or None (not in the paper).
  """
  id: str
  table: str
  group: str
  model: str
  scheme: str
  jpeg_quality: int
  paper: float | None


ROWS: tuple[Row, ...] = (
    Row("convmixer-plain", "II", "convmixer", "ConvMixer-256/8", "none", 0, 96.07),
    Row("convmixer-etc", "II", "convmixer", "ConvMixer-256/8", "etc", 0, 92.72),
    Row("resnet18-plain", "II", "resnet", "ResNet-18", "none", 0, 95.53),
    Row("resnet18-etc", "II", "resnet", "ResNet-18", "etc", 0, None),
    Row("resnet18-pe", "II", "resnet", "ResNet-18", "pe", 0, 91.33),
    Row("convmixer-etc-jpeg85", "III", "convmixer", "ConvMixer-256/8", "etc", 85, 90.43),
    Row("convmixer-etc-jpeg80", "III", "convmixer", "ConvMixer-256/8", "etc", 80, 89.95),
    Row("vit-plain", "II", "vit", "ViT-B/16", "none", 0, 99.06),
    Row("vit-etc", "II", "vit", "ViT-B/16", "etc", 0, 87.89),
    Row("vit-etc-jpeg85", "III", "vit", "ViT-B/16", "etc", 85, 81.99),
    Row("vit-etc-jpeg80", "III", "vit", "ViT-B/16", "etc", 80, 81.84),
    Row("shakedrop-plain", "II", "shakedrop", "PyramidNet-ShakeDrop", "none", 0, 96.70),
    Row("shakedrop-le", "II", "shakedrop", "Adaptation + ShakeDrop", "le", 0, 94.49),
    Row("shakedrop-ele", "II", "shakedrop", "Adaptation + ShakeDrop", "ele", 0, 83.06),
    Row("shakedrop-etc", "II", "shakedrop", "Adaptation + ShakeDrop", "etc", 0, 89.09),
    Row("shakedrop-ele-jpeg85", "III", "shakedrop", "Adaptation + ShakeDrop", "ele", 85, 31.5),
    Row("shakedrop-ele-jpeg80", "III", "shakedrop", "Adaptation + ShakeDrop", "ele", 80, 30.51),
)
SIZES_ROW = "sizes"
# Table IV: plain and EtC megabytes of all 60,000 CIFAR-10 images.
PAPER_SIZES_MB = {"JPEG QF=85": (68.7, 69.0), "JPEG QF=80": (64.4, 64.7),
                  "JPEG-LS": (135.9, 139.7), "JPEG 2000": (157.3, 163.8),
                  "Uncompressed": (178.20, 178.20)}
GROUPS = ("convmixer", "vit", "resnet", "shakedrop")

# Reduced models of the `cpu` and `smoke` budgets: (registry name, overrides, label).
_CPU_MODELS = {
    "convmixer": ("ConvMixer-256_8", dict(dim=128, depth=4, kernel_size=5, patch_size=4),
                  "ConvMixer-128/4 (patch 4, kernel 5)"),
    "resnet": ("ResNet18-cifar", dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128),
                                      stem_width=16),
               "ResNet-10 narrow (1 block per stage, widths 16-128)"),
    "vit": ("ViT-B_16", {}, "ViT-B/16"),
}
_SMOKE_MODELS = {
    "convmixer": ("ConvMixer-tiny-test", {}, "ConvMixer-tiny-test"),
    "resnet": ("ResNet-tiny-test", {}, "ResNet-tiny-test"),
    "vit": ("ViT-tiny-test", {}, "ViT-tiny-test"),
}
# Epochs of the reduced budgets (ViT: steps, as in the paper's fine-tuning).
_EPOCHS = {"cpu": 8, "gpu": 3}
_VIT_STEPS = {"cpu": (100, 200), "gpu": (500, 1000), "smoke": (3, 3)}
# (Adaptation network +) Shake-PyramidNet per budget (`etcjax.models.pyramidnet`): the
# paper's PyramidNet-110 (alpha 270), PyramidNet-26 (alpha 48) for the reduced budgets.
_SHAKEDROP_MODELS = {"paper": "ShakePyramidNet-110_270", "gpu": "ShakePyramidNet-26_48",
                     "cpu": "ShakePyramidNet-26_48", "smoke": "ShakePyramidNet-tiny-test"}


def select_rows(spec: str) -> tuple[list[Row], bool]:
  """Parses `--rows`: comma-separated row ids and groups.

  Returns:
    (the selected training rows in table order, whether Table IV is selected).

  Raises:
    UserError: an unknown name (listing the valid ones).
  """
  ids = {r.id for r in ROWS}
  chosen: set[str] = set()
  sizes = False
  for name in (t.strip() for t in spec.split(",")):
    if not name:
      continue
    if name == "all":
      chosen |= ids
      sizes = True
    elif name in ("table4", SIZES_ROW):
      sizes = True
    elif name in ("table2", "table3"):
      chosen |= {r.id for r in ROWS if r.table == name[5:].upper().replace("2", "II")
                 .replace("3", "III")}
    elif name in GROUPS:
      chosen |= {r.id for r in ROWS if r.group == name}
    elif name in ids:
      chosen.add(name)
    else:
      raise UserError(f"--rows: unknown row {name!r}; valid: all, table2, table3, table4, "
                      f"{', '.join(GROUPS)}, {SIZES_ROW}, {', '.join(r.id for r in ROWS)}")
  if not chosen and not sizes:
    raise UserError("--rows selects nothing")
  return [r for r in ROWS if r.id in chosen], sizes


def check_data(data: str) -> tuple[int, int]:
  """Checks that `data` is CIFAR-10 as image folders; returns (#train, #test) images.

  Raises:
    UserError: a missing or empty folder, or classes other than CIFAR-10's.
  """
  from etcjax.data import sources
  if not os.path.isdir(data):
    raise UserError(f"--data {data}: no such folder")
  counts = []
  for split in ("train", "eval"):
    folder = sources.find_split_dir(data, split)
    files, _, classes = sources.list_labelled_files(folder)
    if classes != CIFAR10_CLASSES:
      raise UserError(f"{folder} has classes {', '.join(classes)}; CIFAR-10 needs the ten "
                      f"folders {', '.join(CIFAR10_CLASSES)}")
    counts.append(len(files))
  return counts[0], counts[1]


def _model_for(row: Row, budget: str) -> tuple[str, dict[str, Any], str] | str:
  """(registry name, overrides, label) of the row's model, or why it cannot run."""
  from etcjax import models
  if row.group == "shakedrop":
    name = _SHAKEDROP_MODELS[budget] + ("" if row.scheme == "none" else "-BlockAdapt")
    if name not in models.names():
      return f"needs the model {name}, not registered in etcjax.models"
    return name, {}, name
  if budget == "smoke":
    return _SMOKE_MODELS[row.group]
  if budget == "cpu":
    return _CPU_MODELS[row.group]
  name = {"convmixer": "ConvMixer-256_8", "resnet": "ResNet18-cifar", "vit": "ViT-B_16"}
  return name[row.group], {}, row.model


def row_config(row: Row, budget: str, *, data: str, out: str, key_file: str,
               init_from: str, num_train: int):
  """The training config of `row` under `budget`, or a string saying why it cannot run.

  Args:
    row: the row; budget: one of `BUDGETS`.
    data: CIFAR-10 folder; out: the reproduction's output folder (for the data cache).
    key_file: the owner's key (encrypted rows).
    init_from: ImageNet-21k ViT-B/16 weights for ViT rows; "" = ViT rows cannot run.
    num_train: number of training images (for epochs -> steps).
  """
  from etcjax import config as config_lib
  tokens = set() if row.scheme == "none" else {row.scheme}
  if row.jpeg_quality:
    tokens.add(f"jpeg{row.jpeg_quality}")
  if row.group == "vit" and not init_from:
    return "needs ImageNet-21k ViT-B/16 weights (--init-from ViT-B_16.npz)"
  model = _model_for(row, budget)
  if isinstance(model, str):
    return model
  name, overrides, _ = model
  if row.group == "convmixer":
    c = config_lib.convmixer_recipe(tokens, train_examples=num_train)
    c.crop_scale_min = 0.75
  elif row.group == "vit":
    c = config_lib.vit_finetune_recipe(tokens)
    c.init_from = init_from
  elif row.group == "resnet":
    c = config_lib.resnet_recipe(tokens, train_examples=num_train)
  else:
    # Madono et al.'s recipe: 4x4 blocks, the block-wise adaptation network for LE, ELE
    # and EtC.
    c = config_lib.shakedrop_recipe(tokens, train_examples=num_train)
  if row.group != "vit":
    c.image_size = 32
  c.dataset = f"folder:{os.path.abspath(data)}"
  c.data_cache_dir = os.path.join(os.path.abspath(out), "cache")
  c.model = name
  c.model_overrides = dict(overrides)
  if row.scheme != "none":
    c.key_file = key_file
  if row.group != "vit":
    _apply_epochs(c, row, budget, num_train)
  else:
    _apply_vit_budget(c, row, budget)
  if budget == "smoke":
    c.num_eval_examples = min(64, c.num_eval_examples or 64)
  return c


def _apply_epochs(c, row: Row, budget: str, num_train: int) -> None:
  """Sets steps, evaluation and checkpoints (every epoch) for `budget`."""
  if budget in ("cpu", "gpu", "smoke"):
    # Short schedules: no mixup / CutMix (they slow early learning), plain images get
    # crops and flips only, encrypted images nothing; the optimiser and schedule shape
    # stay the paper's. Plain and encrypted rows of one model change alike.
    c.batch_size = 16 if budget == "smoke" else 128
    c.mixup_alpha = c.cutmix_alpha = 0.0
    c.augment = "flip_crop" if row.scheme == "none" else "none"
    if budget == "gpu":
      c.dtype = "bfloat16"
  steps_per_epoch = max(1, num_train // c.batch_size)
  if budget == "smoke":
    c.num_train_steps = 4
    c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 2
    return
  if budget in _EPOCHS:
    c.num_train_steps = _EPOCHS[budget] * steps_per_epoch
  c.eval_every_steps = c.checkpoint_every_steps = steps_per_epoch
  c.log_every_steps = max(1, steps_per_epoch // 4)


def _apply_vit_budget(c, row: Row, budget: str) -> None:
  if budget == "paper":
    return
  plain, encrypted = _VIT_STEPS[budget]
  c.num_train_steps = plain if row.scheme == "none" else encrypted
  c.warmup_steps = max(1, c.num_train_steps // 20)
  c.batch_size = {"cpu": 32, "gpu": 512, "smoke": 4}[budget]
  if budget == "gpu":
    c.dtype = "bfloat16"
  c.eval_every_steps = c.checkpoint_every_steps = max(1, c.num_train_steps // 5)
  c.log_every_steps = max(1, c.num_train_steps // 20)


# --------------------------------------------------------------------------------------
# Provenance.


def commit() -> str:
  """The git commit of this checkout (suffix "-dirty" with local changes), or "unknown"."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")


def device_description() -> str:
  """E.g. "cpu (2 x AMD EPYC, 2 cores)" or "gpu (NVIDIA H200)"."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    model = platform.processor() or "CPU"
    try:
      with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                     model)
    except OSError:
      pass
    return f"cpu ({model}, {os.cpu_count()} cores)"
  return f"{dev.platform} ({jax.device_count()} x {dev.device_kind})"


# --------------------------------------------------------------------------------------
# Running.


def _load_results(path: str, budget: str, data: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {"version": RESULTS_VERSION, "budget": budget, "data": data,
            "rows": {}, "skipped": {}}
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: cannot read the results of an earlier run ({e})") from None
  if doc.get("budget") != budget:
    raise UserError(f"{os.path.dirname(path)} holds a reproduction at budget "
                    f"{doc.get('budget')!r}; pass --budget {doc.get('budget')} to continue "
                    f"it, or use another --out")
  doc.setdefault("skipped", {})
  return doc


def _ensure_key(out: str, key_file: str):
  from etcjax.keys import EtcKey
  if key_file:
    return key_file, EtcKey.load(key_file)
  path = os.path.join(out, "owner.key")
  if not os.path.exists(path):
    EtcKey.generate().save(path)
  return path, EtcKey.load(path)


def _param_count(config) -> int:
  import jax
  import numpy as np

  from etcjax import models
  model = models.create(config.model, 10, **config.model_overrides.to_dict())
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)},
      jax.numpy.zeros((1, config.image_size, config.image_size, 3)), train=False))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def run_row(row: Row, config, out: str, label: str, num_train: int, provenance: dict
            ) -> dict[str, Any]:
  """Trains (or resumes) one row in `out/runs/<row.id>`; returns its results entry."""
  from etcjax import train
  workdir = os.path.join(out, "runs", row.id)
  clock_path = os.path.join(workdir, "reproduce_clock.json")
  spent = 0.0
  if os.path.isfile(clock_path):
    with open(clock_path) as f:
      spent = float(json.load(f).get("wall_time_s", 0.0))
  t0 = time.perf_counter()
  try:
    doc = train.train_and_evaluate(config, workdir)
  finally:
    if os.path.isdir(workdir):
      fileio.write_text(clock_path, json.dumps(
          {"wall_time_s": spent + time.perf_counter() - t0}) + "\n")
  wall = spent + time.perf_counter() - t0
  top1 = 100.0 * float(doc["eval_accuracy"])
  steps = int(doc["step"])
  epochs = steps * config.batch_size / num_train
  return {
      "row": row.id, "table": row.table, "paper_model": row.model, "model": label,
      "model_name": config.model, "model_overrides": config.model_overrides.to_dict(),
      "parameters": _param_count(config), "scheme": row.scheme,
      "jpeg_quality": row.jpeg_quality, "budget": provenance["budget"],
      "epochs": round(epochs, 3), "steps": steps, "batch_size": config.batch_size,
      "top1": round(top1, 2), "paper": row.paper,
      "difference": None if row.paper is None else round(top1 - row.paper, 2),
      "wall_time_s": round(wall, 1),
      "eval_examples": (doc.get("history") or [{}])[-1].get("eval_examples"),
      "history": [{"epoch": round(h["step"] * config.batch_size / num_train, 3),
                   "step": h["step"], "top1": round(100.0 * h["eval_accuracy"], 2)}
                  for h in doc.get("history", [])],
      "key_fingerprint": doc.get("key_fingerprint"),
      **{k: provenance[k] for k in ("device", "jax_version", "commit", "date")},
  }


def run_sizes(data: str, out: str, key, budget: str) -> dict[str, Any]:
  """Table IV: total bytes of all images, plain vs EtC, under each compression setting."""
  import concurrent.futures

  import numpy as np

  from etcjax import codec
  from etcjax.data import sources
  images = []
  for split in ("train", "eval"):
    folder = sources.find_split_dir(data, split)
    files, labels, _ = sources.list_labelled_files(folder)
    images.append(sources.decode_folder_split(files, labels, 32,
                                              os.path.join(out, "cache")).array)
  images = np.concatenate(images)
  if budget == "smoke":
    images = images[:64]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The 32x32 key space warning is printed once, above.
    schedules = {(32, 32): key.schedule(32, 32, 16)}
  t0 = time.perf_counter()
  chunks = np.array_split(images, max(1, min(len(images) // 256, 64)))
  # Encoders release the GIL: threads run in parallel.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    parts = list(pool.map(lambda x: codec.size_table(x, schedules=schedules), chunks))
  rows = []
  for i, first in enumerate(parts[0]):
    plain = sum(p[i].plain_bytes for p in parts)
    enc = sum(p[i].etc_bytes for p in parts)
    paper = PAPER_SIZES_MB.get(first.setting)
    rows.append({"setting": first.setting, "plain_bytes": plain, "etc_bytes": enc,
                 "etc_overhead_pct": round(100.0 * (enc / plain - 1), 3),
                 "paper_plain_mb": paper[0] if paper else None,
                 "paper_etc_mb": paper[1] if paper else None,
                 "paper_overhead_pct": round(100.0 * (paper[1] / paper[0] - 1), 2)
                 if paper else None})
  return {"num_images": int(len(images)), "block_size": 16, "subsampling": "4:2:0",
          "key_fingerprint": key.fingerprint, "rows": rows,
          "wall_time_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------
# Reports.


def _fmt(x: float | None, spec: str = ".2f", missing: str = "—") -> str:
  return missing if x is None else format(x, spec)


def drop_summary(rows: dict[str, dict[str, Any]]) -> list[str]:
  """Sentences comparing each model's plain -> EtC drop, from the measured rows."""
  drops = {}
  for group, label in (("convmixer", "ConvMixer"), ("resnet", "ResNet-18"), ("vit", "ViT-B/16")):
    plain, enc = rows.get(f"{group}-plain" if group != "resnet" else "resnet18-plain"), \
        rows.get(f"{group}-etc" if group != "resnet" else "resnet18-etc")
    if plain and enc:
      drops[label] = (plain["top1"], enc["top1"], plain["model"])
  lines = []
  for label, (p, e, model) in drops.items():
    lines.append(f"- {label} ({model}): plain {p:.2f} %, EtC {e:.2f} %: EtC costs "
                 f"{p - e:.2f} points.")
  if "ConvMixer" in drops and "ResNet-18" in drops:
    cm = drops["ConvMixer"][0] - drops["ConvMixer"][1]
    rn = drops["ResNet-18"][0] - drops["ResNet-18"][1]
    verdict = ("less accuracy than" if cm < rn else "more accuracy than" if cm > rn
               else "the same accuracy as")
    lines.append(f"- Measured here, EtC costs the isotropic ConvMixer **{verdict}** the "
                 f"ResNet ({cm:.2f} vs {rn:.2f} points).")
  return lines


def markdown(doc: dict[str, Any]) -> str:
  """`results.md`: the measured rows beside the paper's."""
  rows = doc["rows"]
  lines = [f"# CIFAR-10 reproduction, budget `{doc['budget']}`", "",
           f"Data: `{doc['data']}` ({doc.get('num_train', '?')} train / "
           f"{doc.get('num_test', '?')} test images). Updated {doc.get('date', '?')}, commit "
           f"`{doc.get('commit', '?')}`, {doc.get('device', '?')}, JAX "
           f"{doc.get('jax_version', '?')}. EtC key fingerprint "
           f"`{doc.get('key_fingerprint', '?')}` (block size 16 on 32x32: 4 blocks, a "
           "30.9-bit key space, as in the paper).", ""]
  if doc.get("budget_note"):
    lines += [doc["budget_note"], ""]
  for table in ("II", "III"):
    sel = [r for r in ROWS if r.table == table and (r.id in rows or r.id in doc["skipped"])]
    if not sel:
      continue
    lines += [f"## Table {table}", "",
              "| row | paper's model | model run | encryption | JPEG QF | epochs | top-1 % | "
              "paper % | difference | wall time |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sel:
      m = rows.get(r.id)
      enc = "plain" if r.scheme == "none" else r.scheme.upper()
      qf = r.jpeg_quality or "—"
      if m is None:
        lines.append(f"| {r.id} | {r.model} | not run: {doc['skipped'][r.id]} | {enc} | {qf} "
                     f"| | | {_fmt(r.paper)} | | |")
        continue
      lines.append(f"| {r.id} | {r.model} | {m['model']} | {enc} | {qf} | {m['epochs']:g} | "
                   f"**{m['top1']:.2f}** | {_fmt(r.paper)} | {_fmt(m['difference'], '+.2f')} | "
                   f"{m['wall_time_s'] / 60:.1f} min |")
    lines.append("")
  summary = drop_summary(rows)
  if summary:
    lines += ["## Plain vs EtC, per model", ""] + summary + [""]
  sizes = doc.get("sizes")
  if sizes:
    lines += ["## Table IV: file sizes", "",
              f"All {sizes['num_images']} images, EtC block 16, JPEG 4:2:0; MB = 10^6 bytes.", "",
              "| setting | plain MB | EtC MB | EtC vs plain | paper plain MB | paper EtC MB | "
              "paper EtC vs plain |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in sizes["rows"]:
      lines.append(f"| {s['setting']} | {s['plain_bytes'] / 1e6:.1f} | "
                   f"{s['etc_bytes'] / 1e6:.1f} | {s['etc_overhead_pct']:+.2f} % | "
                   f"{_fmt(s['paper_plain_mb'], '.1f')} | {_fmt(s['paper_etc_mb'], '.1f')} | "
                   f"{_fmt(s['paper_overhead_pct'], '+.2f')}"
                   f"{' %' if s['paper_overhead_pct'] is not None else ''} |")
    lines.append("")
  if rows:
    lines += ["## Test accuracy against epochs", "", "![curves](curves.png)", ""]
  return "\n".join(lines)


def plot_curves(doc: dict[str, Any], path: str) -> None:
  """`curves.png`: test top-1 against epochs, one line per trained row."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for r in ROWS:
    m = doc["rows"].get(r.id)
    if not m or not m["history"]:
      continue
    xs = [h["epoch"] for h in m["history"]]
    ys = [h["top1"] for h in m["history"]]
    style = "-" if r.scheme == "none" else "--" if not r.jpeg_quality else ":"
    ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{r.id} ({m['model']})")
  ax.set_xlabel("epoch")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(f"CIFAR-10, budget {doc['budget']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with fileio.atomic_write(path) as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def _write_outputs(out: str, doc: dict[str, Any]) -> None:
  fileio.write_text(os.path.join(out, "results.json"), json.dumps(doc, indent=1) + "\n")
  fileio.write_text(os.path.join(out, "results.md"), markdown(doc))
  if doc["rows"]:
    plot_curves(doc, os.path.join(out, "curves.png"))


BUDGET_NOTES = {
    "cpu": ("Budget `cpu`: reduced models (ConvMixer-128/4 with patch 4 and kernel 5 for "
            "ConvMixer-256/8; a narrow ResNet-10 for ResNet-18), 8 epochs at batch 128, "
            "crops and flips for plain images and no augmentation for encrypted ones, no "
            "mixup / CutMix; optimisers and schedule shapes are the paper's. Plain and "
            "encrypted rows of a model are reduced alike, so the drop from plain to "
            "encrypted is comparable within a model; absolute accuracies are far below the "
            "paper's 300-epoch figures."),
    "gpu": ("Budget `gpu`: the real ConvMixer-256/8 (and ResNet-18) for 3 epochs at batch "
            "128 in bfloat16, short-schedule augmentation as in `cpu`."),
    "smoke": "Budget `smoke`: a few steps of tiny models; checks the harness, not the paper.",
    "paper": "Budget `paper`: the paper's recipes (`etcjax.config`, `configs/`).",
}


def reproduce(data: str, budget: str, out: str, rows_spec: str = "all",
              init_from: str = "", key_file: str = "") -> dict[str, Any]:
  """Runs the selected rows under `budget`, writing results into `out`; see module doc.

  Returns:
    The results document (also `out/results.json`).

  Raises:
    UserError: bad data folder, unknown budget or row, unreadable key or weights, an
      `out` that holds another budget's reproduction.
  """
  if budget not in BUDGETS:
    raise UserError(f"--budget {budget!r} is not a budget; choose one of: "
                    f"{', '.join(BUDGETS)}")
  rows, sizes = select_rows(rows_spec)
  num_train, num_test = check_data(data)
  if init_from and not os.path.isfile(init_from):
    raise UserError(f"--init-from {init_from}: no such file")
  os.makedirs(out, exist_ok=True)
  results_path = os.path.join(out, "results.json")
  doc = _load_results(results_path, budget, data)
  key_path, key = _ensure_key(out, key_file)
  if doc.get("key_fingerprint") not in (None, key.fingerprint):
    raise UserError(f"{out} was reproduced with the key of fingerprint "
                    f"{doc['key_fingerprint']}, not {key.fingerprint}; pass that key with "
                    "--key, or use another --out")
  from etcjax import keys
  print(f"etcjax reproduce: {keys.keyspace_message(32, 32, 16)}", file=sys.stderr)
  # Said once above; the trainer would repeat it for every encrypted row.
  warnings.simplefilter("ignore", keys.KeySpaceWarning)

  import jax

  # Everything the rows need, imported now: a long reproduction keeps the code it began
  # with even if the checkout changes under it.
  from etcjax import codec, schemes, train  # noqa: F401
  provenance = {"budget": budget, "device": device_description(),
                "jax_version": jax.__version__, "commit": commit(),
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
  doc.update({"num_train": num_train, "num_test": num_test,
              "key_fingerprint": key.fingerprint, "budget_note": BUDGET_NOTES[budget],
              **{k: provenance[k] for k in ("device", "jax_version", "commit", "date")}})
  for row in rows:
    config = row_config(row, budget, data=data, out=out, key_file=key_path,
                        init_from=init_from, num_train=num_train)
    if isinstance(config, str):
      doc["skipped"][row.id] = config
      doc["rows"].pop(row.id, None)
      print(f"etcjax reproduce: {row.id}: not run: {config}", file=sys.stderr)
      continue
    doc["skipped"].pop(row.id, None)
    done = doc["rows"].get(row.id)
    if done and done.get("steps") == config.num_train_steps:
      print(f"etcjax reproduce: {row.id}: done earlier ({done['top1']:.2f} %)",
            file=sys.stderr)
      continue
    label = _model_for(row, budget)[2]
    print(f"etcjax reproduce: {row.id}: {label}, {config.num_train_steps} steps",
          file=sys.stderr)
    doc["rows"][row.id] = run_row(row, config, out, label, num_train, provenance)
    print(f"etcjax reproduce: {row.id}: top-1 {doc['rows'][row.id]['top1']:.2f} % (paper "
          f"{_fmt(row.paper)})", file=sys.stderr)
    _write_outputs(out, doc)
  if sizes:
    if not (doc.get("sizes") and doc["sizes"].get("key_fingerprint") == key.fingerprint):
      print("etcjax reproduce: sizes: Table IV over all images", file=sys.stderr)
      doc["sizes"] = run_sizes(data, out, key, budget)
  _write_outputs(out, doc)
  return doc


# --------------------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of `python -m etcjax.reproduce` and `etcjax reproduce`."""
  parser.add_argument("--data", required=True,
                      help="CIFAR-10 as folders: DIR/train/<class>/*, DIR/test/<class>/*")
  parser.add_argument("--budget", default="cpu",
                      help=f"one of {', '.join(BUDGETS)} (default cpu)")
  parser.add_argument("--rows", default="all",
                      help="comma-separated row ids or groups (all, table2, table3, table4, "
                      f"{', '.join(GROUPS)})")
  parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
  parser.add_argument("--init-from", default="",
                      help="ImageNet-21k ViT-B/16 weights (.npz / .safetensors) for ViT rows")
  parser.add_argument("--key", default="",
                      help="owner key for encrypted rows (default: OUT/owner.key, made once)")


def run_from_args(args: argparse.Namespace) -> int:
  """Runs a parsed command line; returns the exit code."""
  from etcjax.main import setup_logging
  setup_logging()
  doc = reproduce(args.data, args.budget, args.out, args.rows, args.init_from, args.key)
  print(f"etcjax reproduce: {len(doc['rows'])} row(s) done, {len(doc['skipped'])} not run; "
        f"see {os.path.join(args.out, 'results.md')}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m etcjax.reproduce",
                                   description=__doc__.split("\n\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  from etcjax import xla_cpu
  xla_cpu.keep_freed_memory()  # Before JAX starts (see etcjax.xla_cpu).
  try:
    return run_from_args(args)
  except (UserError, ValueError, OSError) as e:
    print(f"etcjax: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("etcjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
