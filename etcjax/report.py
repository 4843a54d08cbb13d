"""Training report: Markdown plus PNG figures from finished runs.

    python -m etcjax.report --out report_dir RUN_DIR [RUN_DIR ...]

For each run folder (a `workdir` of `etcjax.main`) the report lists the model, the
images it saw (plain, or encrypted with the key of a given fingerprint), steps and final
top-1 accuracy, and draws:

* `accuracy.png`: eval accuracy against training steps, one line per run;
* `patch_embeddings.png`: the learned patch-embedding filters of each run side by side
  (the paper's Fig. 5, `etcjax.models.visualize.patch_embedding_grid`);
* `examples.png` (when example images are given): plain images above their encrypted
  versions.

`write_report` is the library form, used by `etcjax.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from etcjax import fileio
from etcjax.errors import UserError


@dataclasses.dataclass
class Run:
  """A finished training run.

  Attributes:
    label: name shown in tables and legends.
    workdir: the run's folder (metrics.json, checkpoints/).
    metrics: its metrics.json.
  """
  label: str
  workdir: str
  metrics: dict[str, Any]

  @classmethod
  def load(cls, workdir: str, label: str | None = None) -> Run:
    path = os.path.join(workdir, "metrics.json")
    try:
      with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    except FileNotFoundError:
      raise UserError(f"{workdir} has no metrics.json: not a finished training run") from None
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read {path}: {e}") from None
    return cls(label or os.path.basename(os.path.normpath(workdir)), workdir, metrics)

  @property
  def images_seen(self) -> str:
    m = self.metrics
    if m.get("encryption", "none") == "none":
      return "plain"
    return f"{m['encryption']} (key {m.get('key_fingerprint')})"

  def final_params(self) -> Any:
    """The parameters of the run's latest checkpoint (NumPy tree)."""
    import jax
    import orbax.checkpoint as ocp

    from etcjax import train
    manager = train.checkpoint_manager(self.workdir)
    step = manager.latest_step()
    if step is None:
      raise UserError(f"{self.workdir} holds no checkpoint")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.device_get(restored["state"]["params"])


def _save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  fileio.write_bytes(path, buf.getvalue())


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def accuracy_figure(runs: Sequence[Run], path: str) -> None:
  """Eval accuracy (%) against step, one line per run."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for run in runs:
    hist = run.metrics.get("history", [])
    ax.plot([h["step"] for h in hist], [100 * h["eval_accuracy"] for h in hist], marker="o",
            markersize=3, label=f"{run.label} ({100 * run.metrics['eval_accuracy']:.1f} %)")
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  _save_figure(fig, path)


def embeddings_figure(runs: Sequence[Run], path: str, max_filters: int = 64) -> None:
  """The first `max_filters` patch-embedding filters of every run, side by side."""
  from etcjax.models import visualize
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.6), squeeze=False)
  for ax, run in zip(axes[0], runs, strict=True):
    grid = visualize.patch_embedding_grid(run.final_params(), max_filters=max_filters)
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(f"{run.label}\n{run.metrics.get('model')}", fontsize=8)
    ax.axis("off")
  _save_figure(fig, path)


def examples_figure(plain: np.ndarray, encrypted: np.ndarray, path: str,
                    caption: str = "encrypted") -> None:
  """Plain images (top row) above their encrypted versions (bottom row).

  Args:
    plain, encrypted: uint8 `(n, h, w, 3)`.
  """
  plt = _pyplot()
  n = len(plain)
  fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.9), squeeze=False)
  for i in range(n):
    for row, (images, title) in enumerate(((plain, "plain"), (encrypted, caption))):
      axes[row, i].imshow(images[i], interpolation="nearest")
      axes[row, i].axis("off")
      if i == 0:
        axes[row, i].set_title(title, fontsize=8, loc="left")
  _save_figure(fig, path)


def runs_table(runs: Sequence[Run]) -> str:
  """A Markdown table: run, model, images, steps, accuracy, loss."""
  lines = ["| run | model | images | steps | test accuracy | test loss |",
           "|---|---|---|---:|---:|---:|"]
  for r in runs:
    m = r.metrics
    lines.append(f"| {r.label} | {m.get('model')} | {r.images_seen} | {m.get('step')} | "
                 f"{100 * m['eval_accuracy']:.2f} % | {m['eval_loss']:.3f} |")
  return "\n".join(lines)


def write_report(out_dir: str, runs: Sequence[Run], *, title: str = "etcjax training report",
                 intro: str = "", examples: tuple[np.ndarray, np.ndarray] | None = None,
                 sections: Sequence[str] = ()) -> str:
  """Writes `out_dir/report.md` and its figures; returns the report's path.

  Args:
    out_dir: destination folder (created).
    runs: finished runs, in table order.
    title, intro: heading and first paragraph (Markdown).
    examples: optional (plain, encrypted) uint8 `(n, h, w, 3)` example images.
    sections: more Markdown sections appended at the end.
  """
  os.makedirs(out_dir, exist_ok=True)
  parts = [f"# {title}", ""]
  if intro:
    parts += [intro, ""]
  if examples is not None:
    examples_figure(*examples, os.path.join(out_dir, "examples.png"))
    parts += ["## Example images", "", "![plain and encrypted examples](examples.png)", ""]
  parts += ["## Results", "", runs_table(runs), ""]
  accuracy_figure(runs, os.path.join(out_dir, "accuracy.png"))
  parts += ["![test accuracy during training](accuracy.png)", ""]
  embeddings_figure(runs, os.path.join(out_dir, "patch_embeddings.png"))
  parts += ["## Learned patch embeddings", "",
            "The first-layer filters of each model (each stretched to its own range), as in "
            "the paper's Fig. 5. A model trained on EtC images learns filters for blocks that "
            "are rotated, flipped, negated and colour-shuffled by the key.", "",
            "![patch embedding filters](patch_embeddings.png)", ""]
  for section in sections:
    parts += [section.rstrip(), ""]
  path = os.path.join(out_dir, "report.md")
  fileio.write_text(path, "\n".join(parts))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m etcjax.report",
                              description="Markdown + PNG report of finished training runs.")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("workdirs", nargs="+", help="run folders (workdirs of etcjax.main)")
  args = p.parse_args(argv)
  try:
    path = write_report(args.out, [Run.load(w) for w in args.workdirs])
  except UserError as e:
    print(f"etcjax: error: {e}", file=sys.stderr)
    return 2
  print(f"report: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
