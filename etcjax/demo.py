"""The demo (`make demo`): `python -m etcjax.demo --out DIR [--tiny]`.

1. Owner side, on the photos bundled with scikit-image and scikit-learn: generate a key,
   encrypt, JPEG-compress (QF 85, 4:2:0), decode, decrypt; file sizes and PSNR
   (`run_owner_roundtrip`: DIR/owner_roundtrip.{md,json,png}, DIR/owner.key, mode 0600).
2. Training, on the embedded digits dataset (`etcjax.config.demo_recipe`) with that key:
   a ConvMixer on plain images, the same ConvMixer on EtC images and a (non-isotropic)
   ResNet on EtC images, each evaluated on the 360 test images (DIR/runs/*).
3. The key check: evaluating the EtC model with another key is refused
   (KeyMismatchError), and forcing it shows why: accuracy falls to about chance.
4. DIR/report.md with the figures: example plain / EtC digits, accuracy curves, the learned
   patch embeddings side by side, and the owner-side numbers.

On a quiet 2-core CPU the demo takes about 2 minutes and reaches 99.2 % (ConvMixer,
plain), 98.6-98.9 % (ConvMixer, EtC; depending on the key) and 97.5 % (ResNet, EtC)
test accuracy; the
ResNet learns EtC digits more slowly (54 % vs 85 % after 45 steps) but this easy task
does not separate the final accuracies. `--tiny` runs every stage for a few steps
(tests); `--owner-only` just step 1.

Running it again into the same folder reuses DIR/owner.key (the owner's key: the runs
were trained with it) and resumes each run from its last checkpoint, so a finished demo
is redone in seconds and an interrupted one continues where it stopped. A run folder made
with other settings (`--tiny` or not, another key) is started again from scratch.
Delete DIR for a fresh key and fresh runs. Bad input (an unreadable or loosely
permissioned owner.key, an --out that is a file) prints one line `etcjax: error: ...`
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings

import numpy as np

from etcjax import codec, etc, fileio, keys, samples, xla_cpu
from etcjax.errors import UserError

REPORT_NAME = "owner_roundtrip"


def run_owner_roundtrip(out_dir: str, quality: int = 85, block_size: int = 16,
                        photos: list[str] | None = None,
                        size: tuple[int, int] | None = None) -> dict:
  """Runs the owner-side round trip and writes the report files into `out_dir`.

  The key is `out_dir/owner.key` if that file exists (an earlier run's: the demo's
  training runs were made with it), else a new one saved there (mode 0600).

  Args:
    out_dir: folder for the report, figure, JSON and key (created).
    quality: JPEG quality factor.
    block_size: EtC block size (16 keeps 4:2:0 MCUs inside blocks).
    photos: names from `etcjax.samples.names()` (default: all).
    size: optional (H, W) to resize-and-crop every photo to (for quick runs).

  Returns:
    {"key_fingerprint", "quality", "block_size", "jpeg_decoder", "images": [per-photo
    dict], "totals": {...}, "report": path, "figure": path, "json": path, "key": path}.
    PSNRs are in dB against the original photo.

  Raises:
    UserError: `out_dir` cannot be made, or an existing owner.key cannot be read (or is
      readable by other users).
  """
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot make the output folder {out_dir}: {e.strerror or e}") from None
  key_path = os.path.join(out_dir, "owner.key")
  if os.path.lexists(key_path):
    key = keys.EtcKey.load(key_path)
  else:
    key = keys.EtcKey.generate()
    key.save(key_path)
  imgs = samples.load_all(size=size, multiple=block_size, which=photos)
  decoder = "nofancy" if codec.nofancy_available() else "pillow"
  rows, figure_rows = [], []
  for name, img in imgs.items():
    h, w = img.shape[:2]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", keys.KeySpaceWarning)
      s = key.schedule(h, w, block_size)
    enc = etc.encrypt(img, s)
    plain_jpg = codec.encode(img, "jpeg", quality)
    etc_jpg = codec.encode(enc, "jpeg", quality)
    plain_png, etc_png = codec.encode(img, "png"), codec.encode(enc, "png")
    dec = etc.decrypt(codec.decode_jpeg(etc_jpg, decoder), s)
    dec_pillow = etc.decrypt(codec.decode_jpeg(etc_jpg, "pillow"), s)
    rows.append({
        "name": name, "height": h, "width": w,
        "keyspace_bits": keys.keyspace_bits(h, w, block_size),
        "lossless_roundtrip": bool(np.array_equal(etc.decrypt(enc, s), img)),
        "raw_bytes": img.size,
        "plain_png_bytes": len(plain_png), "etc_png_bytes": len(etc_png),
        "plain_jpeg_bytes": len(plain_jpg), "etc_jpeg_bytes": len(etc_jpg),
        "plain_jpeg_psnr": codec.psnr(img, codec.decode_jpeg(plain_jpg, decoder)),
        "etc_jpeg_psnr": codec.psnr(img, dec),
        "plain_jpeg_psnr_pillow": codec.psnr(img, codec.decode_jpeg(plain_jpg, "pillow")),
        "etc_jpeg_psnr_pillow": codec.psnr(img, dec_pillow),
    })
    figure_rows.append((name, img, enc, dec))
  tot = {k: int(sum(r[k] for r in rows)) for k in
         ("raw_bytes", "plain_png_bytes", "etc_png_bytes", "plain_jpeg_bytes", "etc_jpeg_bytes")}
  tot["jpeg_overhead"] = tot["etc_jpeg_bytes"] / tot["plain_jpeg_bytes"] - 1
  tot["png_overhead"] = tot["etc_png_bytes"] / tot["plain_png_bytes"] - 1
  tot["mean_plain_jpeg_psnr"] = float(np.mean([r["plain_jpeg_psnr"] for r in rows]))
  tot["mean_etc_jpeg_psnr"] = float(np.mean([r["etc_jpeg_psnr"] for r in rows]))
  tot["mean_etc_jpeg_psnr_pillow"] = float(np.mean([r["etc_jpeg_psnr_pillow"] for r in rows]))
  base = os.path.join(out_dir, REPORT_NAME)
  result = {"key_fingerprint": key.fingerprint, "quality": quality, "block_size": block_size,
            "jpeg_decoder": decoder, "images": rows, "totals": tot,
            "report": base + ".md", "figure": base + ".png", "json": base + ".json",
            "key": key_path}
  _write_figure(result["figure"], figure_rows[:4])
  fileio.write_text(result["report"], _markdown(result))
  fileio.write_text(result["json"], json.dumps(result, indent=1) + "\n")
  return result


def _markdown(r: dict) -> str:
  t = r["totals"]
  lines = [
      "# EtC owner-side round trip",
      "",
      f"Key fingerprint `{r['key_fingerprint']}`, block size {r['block_size']}, JPEG QF "
      f"{r['quality']} (4:2:0), decoder for PSNR: `{r['jpeg_decoder']}`. Photos bundled with "
      "scikit-image and scikit-learn. PSNR in dB against the original; EtC PSNR is after "
      "decryption.",
      "",
      "| photo | size | key space (bits) | plain JPEG B | EtC JPEG B | EtC/plain | "
      "plain PSNR | EtC PSNR | EtC PSNR (Pillow decoder) |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for x in r["images"]:
    lines.append(
        f"| {x['name']} | {x['height']}x{x['width']} | {x['keyspace_bits']:.0f} | "
        f"{x['plain_jpeg_bytes']} | {x['etc_jpeg_bytes']} | "
        f"{100 * (x['etc_jpeg_bytes'] / x['plain_jpeg_bytes'] - 1):+.1f}% | "
        f"{x['plain_jpeg_psnr']:.2f} | {x['etc_jpeg_psnr']:.2f} | "
        f"{x['etc_jpeg_psnr_pillow']:.2f} |")
  lines += [
      "",
      f"Totals: uncompressed {t['raw_bytes']} B; PNG plain {t['plain_png_bytes']} B vs EtC "
      f"{t['etc_png_bytes']} B ({100 * t['png_overhead']:+.1f}%); JPEG plain "
      f"{t['plain_jpeg_bytes']} B vs EtC {t['etc_jpeg_bytes']} B "
      f"({100 * t['jpeg_overhead']:+.1f}%).",
      f"Mean PSNR: plain JPEG {t['mean_plain_jpeg_psnr']:.2f} dB, decrypted EtC JPEG "
      f"{t['mean_etc_jpeg_psnr']:.2f} dB ({r['jpeg_decoder']} decoder), "
      f"{t['mean_etc_jpeg_psnr_pillow']:.2f} dB with Pillow's default decoder, whose chroma "
      "upsampling blends neighbouring (unrelated) blocks.",
      "",
      f"Lossless round trip bit-exact for every photo: "
      f"{all(x['lossless_roundtrip'] for x in r['images'])}.",
      "",
      f"![plain / encrypted / decrypted]({os.path.basename(r['figure'])})",
      "",
  ]
  return "\n".join(lines)


def _write_figure(path: str, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
  for i, (name, img, enc, dec) in enumerate(rows):
    for j, (im, title) in enumerate(((img, f"{name}: plain"), (enc, "EtC (encrypted)"),
                                      (dec, "decrypted from JPEG QF85"))):
      axes[i, j].imshow(im)
      axes[i, j].set_title(title, fontsize=9)
      axes[i, j].axis("off")
  fig.tight_layout()
  with fileio.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=80)
  plt.close(fig)


# ----------------------------------------------------------------------------------------
# Training on the embedded digits, and the report.

# (label, folder, demo_recipe tokens)
DEMO_RUNS = (("ConvMixer, plain", "convmixer_plain", {"plain"}),
             ("ConvMixer, EtC", "convmixer_etc", {"etc"}),
             ("ResNet, EtC", "resnet_etc", {"etc", "resnet"}))


def _demo_config(tokens: set[str], key_file: str, tiny: bool):
  from etcjax import config as config_lib
  config = config_lib.demo_recipe(tokens | ({"tiny"} if tiny else set()))
  if config.encryption != "none":
    config.key_file = key_file
  return config


def _key_check(workdir: str, tokens: set[str], out_dir: str, tiny: bool) -> dict:
  """Evaluates an EtC run with another key: refused, and (forced) near chance."""
  import orbax.checkpoint as ocp

  from etcjax import train
  from etcjax.errors import KeyMismatchError
  other = os.path.join(out_dir, "other.key")
  keys.EtcKey.generate().save(other, overwrite=True)
  config = _demo_config(tokens, other, tiny)
  try:
    train.evaluate(config, workdir)
    refused = None
  except KeyMismatchError as e:
    refused = str(e)
  # What the check prevents: the model applied to images of another key.
  setup = train.build(config, train=False)
  manager = train.checkpoint_manager(workdir)
  target = train.abstract_state(setup, train.make_optimizer(config))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  forced = train.run_eval(setup, state, train.make_eval_step(setup))
  return {"refused": refused, "forced_accuracy": forced["eval_accuracy"],
          "other_fingerprint": keys.EtcKey.load(other).fingerprint}


def _examples(key_file: str, block_size: int, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
  from etcjax.data import sources
  plain = sources.digits_arrays()[2][:n]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keys.KeySpaceWarning)
    schedule = keys.EtcKey.load(key_file).schedule(*plain.shape[1:3], block_size)
  return plain, etc.encrypt(plain, schedule)


def _owner_section(owner: dict) -> str:
  t = owner["totals"]
  return "\n".join([
      "## Owner side: encryption, compression, decryption", "",
      f"{len(owner['images'])} photos, key `{owner['key_fingerprint']}`, block size "
      f"{owner['block_size']}: JPEG QF {owner['quality']} files of EtC images are "
      f"{100 * t['jpeg_overhead']:+.1f} % the size of plain ones; decrypted EtC JPEGs reach "
      f"{t['mean_etc_jpeg_psnr']:.2f} dB PSNR against {t['mean_plain_jpeg_psnr']:.2f} dB "
      f"for plain JPEGs. Details: [owner_roundtrip.md](owner_roundtrip.md).", "",
      "![plain / encrypted / decrypted](owner_roundtrip.png)"])


def _key_section(check: dict, label: str) -> str:
  refused = (f"refused: `etcjax: error: {check['refused']}`" if check["refused"]
             else "NOT refused (this is a bug)")
  return "\n".join([
      "## The key check", "",
      f"Evaluating the {label} model on test images encrypted with another key (fingerprint "
      f"`{check['other_fingerprint']}`) is {refused}", "",
      f"Forcing that evaluation gives {100 * check['forced_accuracy']:.1f} % accuracy "
      "(chance: 10 %): a model trained on EtC images is bound to its key, so a wrong key "
      "must be an error rather than a silently useless model."])


def _prepare_workdir(workdir: str, config, fingerprint: str | None) -> int:
  """Makes `workdir` ready for `config`: the step to resume from (0 = a fresh start).

  A folder whose `config.json` records another config or key (an earlier run with or
  without `--tiny`, or before owner.key was replaced) is removed, so the run starts
  again instead of failing (another key) or continuing a run of other settings.
  """
  record = os.path.join(workdir, "config.json")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    return 0
  try:
    with open(record) as f:
      old = json.load(f)
  except (OSError, ValueError):
    old = None
  def comparable(rec):  # The key file's path may differ (a moved folder), not its key.
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
      return None
    return {**rec, "config": {**rec["config"], "key_file": ""}}

  want = {"config": json.loads(config.to_json()), "encryption": config.encryption,
          "key_fingerprint": fingerprint}
  if comparable(old) != comparable(want):
    if old is not None or os.path.isdir(checkpoints):
      print(f"  {workdir} holds a run of other settings: starting it again", flush=True)
    shutil.rmtree(workdir)
    return 0
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] \
      if os.path.isdir(checkpoints) else []
  return max(steps, default=0)


def run_training_demo(out_dir: str, tiny: bool = False) -> dict:
  """Runs the whole demo (module docstring) into `out_dir`; returns paths and numbers.

  Into a folder of an earlier demo: reuses its owner.key and resumes its runs.
  """
  from etcjax import report, train
  photos = {"photos": ["chelsea", "coffee"], "size": (64, 96)} if tiny else {}
  print("owner side: key, EtC, JPEG round trip on bundled photos ...", flush=True)
  owner = run_owner_roundtrip(out_dir, **photos)
  runs = []
  for label, folder, tokens in DEMO_RUNS:
    config = _demo_config(tokens, owner["key"], tiny)
    workdir = os.path.join(out_dir, "runs", folder)
    fingerprint = owner["key_fingerprint"] if config.encryption != "none" else None
    start = _prepare_workdir(workdir, config, fingerprint)
    resume = f" (resuming at step {start})" if start else ""
    print(f"training {label}: {config.model}, {config.num_train_steps} steps{resume} ...",
          flush=True)
    result = train.train_and_evaluate(config, workdir)
    print(f"  test accuracy {100 * result['eval_accuracy']:.2f} %", flush=True)
    runs.append(report.Run.load(workdir, label))
  label, folder, tokens = DEMO_RUNS[1]
  print(f"key check: evaluating {label} with another key ...", flush=True)
  check = _key_check(os.path.join(out_dir, "runs", folder), tokens, out_dir, tiny)
  block_size = _demo_config(tokens, owner["key"], tiny).block_size
  acc = {r.label: 100 * r.metrics["eval_accuracy"] for r in runs}
  intro = (
      "Handwritten digits (scikit-learn, as coloured 32x32 images; 1437 train / 360 test) "
      f"encrypted on the fly with the EtC key `{owner['key_fingerprint']}` (block size "
      f"{block_size}: 16 blocks per image, each permuted, rotated / flipped, negated and "
      "colour-shuffled by the key). The paper's claim is that isotropic networks with a "
      "patch embedding (ViT, ConvMixer) learn EtC images nearly as well as plain ones "
      f"(MaungMaung & Kiya 2022). Here the ConvMixer reaches {acc['ConvMixer, plain']:.1f} % "
      f"on plain and {acc['ConvMixer, EtC']:.1f} % on EtC images, the ResNet "
      f"{acc['ResNet, EtC']:.1f} % on EtC images.")
  path = report.write_report(
      out_dir, runs, title="etcjax demo: classifying EtC images", intro=intro,
      examples=_examples(owner["key"], block_size),
      sections=[_key_section(check, label), _owner_section(owner)])
  return {"report": path, "owner": owner, "key_check": check,
          "runs": {r.label: r.metrics["eval_accuracy"] for r in runs}}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m etcjax.demo", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
  p.add_argument("--tiny", action="store_true",
                 help="a few training steps and two small photos (for tests)")
  p.add_argument("--owner-only", action="store_true",
                 help="only the owner-side round trip on photos (no training)")
  p.add_argument("--quality", type=int, default=85, help="JPEG quality factor (default 85)")
  p.add_argument("--photos", nargs="+", choices=samples.names(), metavar="NAME",
                 help=f"photos to use (default: all of {', '.join(samples.names())})")
  p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                 help="resize-and-crop every photo to H x W (default: native size)")
  args = p.parse_args(argv)
  try:
    return _run(args)
  except (UserError, ValueError, OSError) as e:
    print(f"etcjax: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("etcjax: interrupted (run the demo again to resume)", file=sys.stderr)
    return 130


def _run(args: argparse.Namespace) -> int:
  if not args.owner_only:
    xla_cpu.keep_freed_memory()  # On CPU unless ETCJAX_KEEP_FREED_MEMORY=0 (etcjax.xla_cpu).
    r = run_training_demo(args.out, tiny=args.tiny)
    for label, acc in r["runs"].items():
      print(f"{label}: {100 * acc:.2f} % test accuracy")
    print(f"report: {r['report']}")
    return 0
  r = run_owner_roundtrip(args.out, quality=args.quality, photos=args.photos,
                          size=tuple(args.size) if args.size else None)
  t = r["totals"]
  print(f"{len(r['images'])} photos, key {r['key_fingerprint']}: JPEG QF{r['quality']} EtC "
        f"{100 * t['jpeg_overhead']:+.1f}% bytes vs plain; PSNR plain "
        f"{t['mean_plain_jpeg_psnr']:.2f} dB, EtC decrypted {t['mean_etc_jpeg_psnr']:.2f} dB")
  print(f"report: {r['report']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
