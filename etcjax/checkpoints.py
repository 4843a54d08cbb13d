"""Pretrained ViT weights from local files: vision_transformer / big_vision .npz, timm / HF.

Nothing is downloaded here: pass the path of a file you fetched yourself. Supported layouts
(detected from the file's contents, not its name):

* google-research/vision_transformer `.npz` (e.g. the ImageNet-21k `ViT-B_16.npz`, the AugReg
  `B_16-i21k-300ep-...npz`): flat keys such as `embedding/kernel`, `cls`,
  `Transformer/posembed_input/pos_embedding`,
  `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel (D, heads, D/heads)`,
  `pre_logits/kernel`, `head/kernel`; pre-linen module numbers (`LayerNorm_2`,
  `MlpBlock_3`) are renumbered as `flax.training.checkpoints.convert_pre_linen` does. An
  `opt/target/` prefix (fine-tuning checkpoints) is accepted.
* google-research/big_vision `.npz`: keys under `params/` (other top-level groups such as
  optimizer state are ignored), `pos_embedding` at the top level and added *before* the class
  token is prepended, blocks either per layer (`encoderblock_{i}`) or scanned
  (`Transformer/encoderblock/...` with every leaf stacked on a leading depth axis).
* timm `safetensors` (e.g. `timm/vit_base_patch16_224.augreg_in21k` on the Hugging Face hub):
  PyTorch names and layouts, `patch_embed.proj.weight (D, 3, p, p)`, `cls_token`,
  `pos_embed`, `blocks.{i}.attn.qkv.weight (3D, D)` (fused q, k, v), `blocks.{i}.mlp.fc1`,
  `norm`, optional `pre_logits.fc`, `head`.
* Hugging Face transformers `safetensors` (`ViTModel` / `ViTForImageClassification`, e.g.
  `google/vit-base-patch16-224-in21k`): `embeddings.*`, `encoder.layer.{i}.*`,
  `layernorm`, `pooler.dense` (tanh: the representation layer), `classifier`, optionally
  under a `vit.` prefix. Note HF's LayerNorm epsilon is 1e-12 where this model uses 1e-6;
  the difference is far below float32 noise for trained weights.

safetensors files are read with the `safetensors` NumPy API: no torch at run time.

Adaptation to the target model (`load_pretrained`): the position embedding grid is resampled
bilinearly (corner-aligned, `scipy.ndimage.zoom(order=1)` as vision_transformer and big_vision
do) when the image size differs, the class token's entry untouched; `pre_logits` is kept when
the model config asks for `representation_size` and dropped otherwise; the head is kept when
the class count matches and re-initialised to zeros when it does not (or is absent).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage
from flax import traverse_util

from etcjax.errors import UserError
from etcjax.models import vit

logger = logging.getLogger(__name__)

Params = dict[str, Any]
FORMATS = ("vision_transformer", "big_vision", "timm", "huggingface")


# ----------------------------------------------------------------------------- reading files


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an `.npz` or `.safetensors` file into a flat `{name: array}` dict.

  The container is recognised from its first bytes (zip for .npz; an 8-byte little-endian
  header length followed by a JSON header for safetensors).

  Raises:
    UserError: the file is missing or is neither container.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"pretrained checkpoint not found: {path}")
  with open(path, "rb") as f:
    head = f.read(9)
  try:
    if zipfile.is_zipfile(path):
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
    if len(head) == 9 and head[8:9] == b"{":
      from safetensors.numpy import load_file
      return load_file(path)
  except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
    raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  raise UserError(f"{path} is not an .npz or .safetensors file")


# ------------------------------------------------------------------- layout -> canonical tree


def _convert_pre_linen(tree: Any) -> Any:
  """Renumbers auto-named submodules per type, like flax's `convert_pre_linen`.

  Pre-linen Flax numbered submodules with one counter per parent (`LayerNorm_0`,
  `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`); linen counts per type
  (`LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`). Names
  already in linen form are unchanged.
  """
  if not isinstance(tree, Mapping):
    return tree
  by_type: dict[str, list[tuple[int, str]]] = {}
  for key in tree:
    m = re.fullmatch(r"(.+)_(\d+)", key)
    if m and m.group(1) not in ("encoderblock",):
      by_type.setdefault(m.group(1), []).append((int(m.group(2)), key))
  renamed = {}
  for prefix, items in by_type.items():
    for new_index, (_, key) in enumerate(sorted(items)):
      renamed[key] = f"{prefix}_{new_index}"
  return {renamed.get(k, k): _convert_pre_linen(v) for k, v in tree.items()}


def _unflatten(flat: Mapping[str, np.ndarray]) -> Params:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _from_flax_npz(arrays: Mapping[str, np.ndarray]) -> tuple[str, Params]:
  """vision_transformer / big_vision npz -> canonical tree (vision_transformer posemb)."""
  for prefix in ("opt/target/", "params/img/", "params/", ""):
    if prefix + "embedding/kernel" in arrays:
      break
  else:
    raise UserError("not a ViT checkpoint: no 'embedding/kernel' patch embedding "
                    f"(first keys: {', '.join(sorted(arrays)[:5])})")
  flat = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  tree = _convert_pre_linen(_unflatten(flat))
  encoder = tree.get("Transformer")
  if not isinstance(encoder, dict):
    raise UserError("not a ViT checkpoint: no 'Transformer' encoder")
  fmt = "vision_transformer"
  if "encoderblock" in encoder:  # big_vision with scan=True
    tree = vit.unscan_params(tree)
    encoder = tree["Transformer"]
    fmt = "big_vision"
  # big_vision adds its posemb (top level, or inside Transformer in 2021-era code) to the
  # patch tokens before prepending the class token; that equals a vision_transformer posemb
  # whose class-token row is zero.
  posemb = None
  if "pos_embedding" in tree:
    posemb, fmt = tree.pop("pos_embedding"), "big_vision"
  elif "pos_embedding" in encoder:
    posemb, fmt = encoder.pop("pos_embedding"), "big_vision"
  if posemb is not None:
    if "cls" in tree and _grid_side(posemb.shape[1]) is not None:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    encoder["posembed_input"] = {"pos_embedding": posemb}
  if "MAPHead_0" in tree:
    raise UserError("unsupported ViT checkpoint: attention-pooling (MAP) head; "
                    "only class-token and average-pooled ViTs are supported")
  return fmt, tree


def _linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return np.ascontiguousarray(w.T)


def _from_torch_vit(arrays: Mapping[str, np.ndarray], num_heads: int) -> tuple[str, Params]:
  """timm or Hugging Face ViT state dict -> canonical tree."""
  if "patch_embed.proj.weight" in arrays:
    fmt, names = "timm", _TIMM_NAMES
  else:
    prefix = "vit." if "vit.embeddings.patch_embeddings.projection.weight" in arrays else ""
    if prefix + "embeddings.patch_embeddings.projection.weight" not in arrays:
      raise UserError("not a ViT checkpoint: no timm 'patch_embed.proj.weight' or Hugging "
                      "Face 'embeddings.patch_embeddings.projection.weight' "
                      f"(first keys: {', '.join(sorted(arrays)[:5])})")
    fmt = "huggingface"
    names = {k: (v if v.startswith("classifier") else prefix + v)
             for k, v in _HF_NAMES.items()}
  for unsupported in ("reg_token", "fc_norm.weight", "attn_pool.latent"):
    if unsupported in arrays:
      raise UserError(f"unsupported timm ViT checkpoint: has '{unsupported}' (register tokens,"
                      " fc_norm or attention pooling); only class-token ViTs are supported")

  def get(key: str) -> np.ndarray:
    try:
      return arrays[key]
    except KeyError:
      raise UserError(f"{fmt} ViT checkpoint lacks '{key}'") from None

  def block(i: int, name: str) -> str:
    return names[name].format(i=i)

  tree: Params = {
      "embedding": {"kernel": np.transpose(get(names["patch_w"]), (2, 3, 1, 0)),
                    "bias": get(names["patch_b"])},
      "cls": get(names["cls"]),
      "Transformer": {
          "posembed_input": {"pos_embedding": get(names["posemb"])},
          "encoder_norm": {"scale": get(names["norm_w"]), "bias": get(names["norm_b"])}}}
  depth = 0
  while block(depth, "ln1_w") in arrays:
    depth += 1
  if depth == 0:
    raise UserError(f"{fmt} ViT checkpoint has no transformer blocks")
  d = tree["embedding"]["bias"].shape[0]
  if d % num_heads:
    raise UserError(f"width {d} of the checkpoint is not divisible by num_heads={num_heads}")
  hd = d // num_heads
  for i in range(depth):
    if fmt == "timm":
      qkv_w, qkv_b = get(block(i, "qkv_w")), get(block(i, "qkv_b"))
      qkv = {n: (qkv_w[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d])
             for j, n in enumerate(("query", "key", "value"))}
    else:
      qkv = {n: (get(block(i, f"{n}_w")), get(block(i, f"{n}_b")))
             for n in ("query", "key", "value")}
    attn = {n: {"kernel": _linear(w).reshape(d, num_heads, hd), "bias": b.reshape(num_heads, hd)}
            for n, (w, b) in qkv.items()}
    attn["out"] = {"kernel": _linear(get(block(i, "proj_w"))).reshape(num_heads, hd, d),
                   "bias": get(block(i, "proj_b"))}
    tree["Transformer"][f"encoderblock_{i}"] = {
        "LayerNorm_0": {"scale": get(block(i, "ln1_w")), "bias": get(block(i, "ln1_b"))},
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": {"scale": get(block(i, "ln2_w")), "bias": get(block(i, "ln2_b"))},
        "MlpBlock_0": {
            "Dense_0": {"kernel": _linear(get(block(i, "fc1_w"))), "bias": get(block(i, "fc1_b"))},
            "Dense_1": {"kernel": _linear(get(block(i, "fc2_w"))), "bias": get(block(i, "fc2_b"))},
        }}
  if names["pre_logits_w"] in arrays:
    tree["pre_logits"] = {"kernel": _linear(get(names["pre_logits_w"])),
                          "bias": get(names["pre_logits_b"])}
  if names["head_w"] in arrays and arrays[names["head_w"]].size:
    tree["head"] = {"kernel": _linear(get(names["head_w"])), "bias": get(names["head_b"])}
  return fmt, tree


_TIMM_NAMES = {
    "patch_w": "patch_embed.proj.weight", "patch_b": "patch_embed.proj.bias",
    "cls": "cls_token", "posemb": "pos_embed", "norm_w": "norm.weight", "norm_b": "norm.bias",
    "ln1_w": "blocks.{i}.norm1.weight", "ln1_b": "blocks.{i}.norm1.bias",
    "qkv_w": "blocks.{i}.attn.qkv.weight", "qkv_b": "blocks.{i}.attn.qkv.bias",
    "proj_w": "blocks.{i}.attn.proj.weight", "proj_b": "blocks.{i}.attn.proj.bias",
    "ln2_w": "blocks.{i}.norm2.weight", "ln2_b": "blocks.{i}.norm2.bias",
    "fc1_w": "blocks.{i}.mlp.fc1.weight", "fc1_b": "blocks.{i}.mlp.fc1.bias",
    "fc2_w": "blocks.{i}.mlp.fc2.weight", "fc2_b": "blocks.{i}.mlp.fc2.bias",
    "pre_logits_w": "pre_logits.fc.weight", "pre_logits_b": "pre_logits.fc.bias",
    "head_w": "head.weight", "head_b": "head.bias",
}

_HF_LAYER = "encoder.layer.{i}."
_HF_NAMES = {
    "patch_w": "embeddings.patch_embeddings.projection.weight",
    "patch_b": "embeddings.patch_embeddings.projection.bias",
    "cls": "embeddings.cls_token", "posemb": "embeddings.position_embeddings",
    "norm_w": "layernorm.weight", "norm_b": "layernorm.bias",
    "ln1_w": _HF_LAYER + "layernorm_before.weight", "ln1_b": _HF_LAYER + "layernorm_before.bias",
    "query_w": _HF_LAYER + "attention.attention.query.weight",
    "query_b": _HF_LAYER + "attention.attention.query.bias",
    "key_w": _HF_LAYER + "attention.attention.key.weight",
    "key_b": _HF_LAYER + "attention.attention.key.bias",
    "value_w": _HF_LAYER + "attention.attention.value.weight",
    "value_b": _HF_LAYER + "attention.attention.value.bias",
    "proj_w": _HF_LAYER + "attention.output.dense.weight",
    "proj_b": _HF_LAYER + "attention.output.dense.bias",
    "ln2_w": _HF_LAYER + "layernorm_after.weight", "ln2_b": _HF_LAYER + "layernorm_after.bias",
    "fc1_w": _HF_LAYER + "intermediate.dense.weight",
    "fc1_b": _HF_LAYER + "intermediate.dense.bias",
    "fc2_w": _HF_LAYER + "output.dense.weight", "fc2_b": _HF_LAYER + "output.dense.bias",
    "pre_logits_w": "pooler.dense.weight", "pre_logits_b": "pooler.dense.bias",
    "head_w": "classifier.weight", "head_b": "classifier.bias",
}


def read_vit(path: str | os.PathLike, num_heads: int) -> tuple[str, Params]:
  """Reads a ViT checkpoint in any supported layout.

  Args:
    path: local `.npz` or `.safetensors` file.
    num_heads: attention heads (needed to split the fused PyTorch projections).

  Returns:
    `(format, params)`: format is one of `FORMATS`; params is a nested dict of NumPy arrays in
    this package's per-layer layout (`vit` module docstring), exactly as stored: position
    embedding not resampled, `pre_logits` and `head` as found.
  """
  arrays = read_arrays(path)
  if any("." in k for k in arrays) and not any("/" in k for k in arrays):
    fmt, tree = _from_torch_vit(arrays, num_heads)
  else:
    fmt, tree = _from_flax_npz(arrays)
  return fmt, tree


# ------------------------------------------------------------------------------- adaptation


def _grid_side(num_tokens: int) -> int | None:
  side = int(round(num_tokens ** 0.5))
  return side if side * side == num_tokens else None


def resample_posemb(posemb: np.ndarray, grid: tuple[int, int], num_prefix_tokens: int = 1
                    ) -> np.ndarray:
  """Resizes a position embedding to a new patch grid, keeping the prefix (class) tokens.

  Args:
    posemb: `(1, num_prefix_tokens + S * S, D)` with a square S x S grid in raster order.
    grid: target `(rows, cols)` of the patch grid.
    num_prefix_tokens: leading entries not on the grid (1 for the class token, 0 for "gap").

  Returns:
    `(1, num_prefix_tokens + rows * cols, D)`, the grid bilinearly resampled with corners
    aligned (`scipy.ndimage.zoom(order=1)`, as vision_transformer / big_vision), the prefix
    rows copied unchanged. The identity (a copy) when the grid already has that size.
  """
  prefix, flat = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  side = _grid_side(flat.shape[0])
  if side is None:
    raise UserError(f"position embedding with {flat.shape[0]} grid tokens is not a square grid")
  rows, cols = grid
  if (side, side) == (rows, cols):
    return np.array(posemb)
  logger.info("resampling position embedding grid %dx%d -> %dx%d", side, side, rows, cols)
  g = flat.reshape(side, side, -1).astype(np.float32)
  g = scipy.ndimage.zoom(g, (rows / side, cols / side, 1), order=1)
  return np.concatenate([prefix, g.reshape(1, rows * cols, -1)], axis=1).astype(posemb.dtype)


def _as_config(model_config: Any) -> ml_collections.ConfigDict:
  if isinstance(model_config, str):
    return vit.get_config(model_config)
  return ml_collections.ConfigDict(dict(model_config))


def expected_shapes(model_config: Any, image_size: int | tuple[int, int], num_classes: int
                    ) -> Params:
  """Parameter shapes (`jax.ShapeDtypeStruct` tree) of the unscanned target model."""
  cfg = _as_config(model_config)
  cfg.scan = False
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  model = vit.VisionTransformer(num_classes=num_classes, **cfg)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3)), train=False))["params"]


def load_pretrained(path: str | os.PathLike, model_config: Any,
                    image_size: int | tuple[int, int], num_classes: int) -> Params:
  """Loads a pretrained ViT for fine-tuning on `num_classes` classes at `image_size`.

  Args:
    path: local checkpoint file in a supported layout (module docstring).
    model_config: a `vit.get_config(...)` ConfigDict / dict of `VisionTransformer` fields, or a
      name such as "ViT-B_16". `representation_size` None drops the checkpoint's `pre_logits`
      layer; a size keeps it (the checkpoint must have one of that size). `scan=True` returns
      the stacked layout.
    image_size: training image side (int) or `(height, width)`; the position embedding is
      resampled to the new patch grid when it differs from the checkpoint's.
    num_classes: head size; the checkpoint's head is kept when it has this many classes and
      replaced by zeros otherwise.

  Returns:
    A nested dict of float32 NumPy arrays usable as
    `VisionTransformer(num_classes=num_classes, **model_config).apply({"params": p}, x)`.

  Raises:
    UserError: missing / unreadable file, not a ViT checkpoint, or a parameter whose shape
      differs from the model's (the message names the parameter and both shapes).
  """
  cfg = _as_config(model_config)
  fmt, tree = read_vit(path, cfg.num_heads)
  expected = expected_shapes(cfg, image_size, num_classes)
  classifier = cfg.get("classifier", "token")
  if ("cls" in tree) != (classifier == "token"):
    have = "a class token" if "cls" in tree else "no class token"
    raise UserError(f"{fmt} checkpoint {os.fspath(path)} has {have} but the model config has "
                    f"classifier={classifier!r}")

  # pre_logits: kept on request, dropped otherwise.
  if cfg.get("representation_size") is None:
    if tree.pop("pre_logits", None) is not None:
      logger.info("dropping the checkpoint's pre_logits layer (representation_size=None)")
  elif "pre_logits" not in tree:
    raise UserError(f"{fmt} checkpoint {os.fspath(path)} has no pre_logits layer; set "
                    "representation_size=None")

  # Head: kept when the class count matches, zeros otherwise (the fine-tuning convention).
  head = tree.pop("head", None)
  want = expected["head"]
  if head is not None and head["kernel"].shape == want["kernel"].shape:
    tree["head"] = head
  else:
    logger.info("re-initialising the head to zeros for %d classes", num_classes)
    tree["head"] = {k: np.zeros(v.shape, np.float32) for k, v in want.items()}

  posembed = tree["Transformer"].get("posembed_input", {})
  if "pos_embedding" in posembed:
    target = expected["Transformer"]["posembed_input"]["pos_embedding"].shape
    p = cfg.patch_size
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    n_prefix = 1 if classifier == "token" else 0
    if posembed["pos_embedding"].shape != target:
      posembed["pos_embedding"] = resample_posemb(posembed["pos_embedding"], (h // p, w // p),
                                                  n_prefix)

  got = traverse_util.flatten_dict(tree, sep="/")
  want_flat = traverse_util.flatten_dict(expected, sep="/")
  missing = sorted(set(want_flat) - set(got))
  extra = sorted(set(got) - set(want_flat))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if extra:
      parts.append(f"unexpected {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else ""))
    raise UserError(f"{fmt} checkpoint {os.fspath(path)} does not fit the model config: "
                    + "; ".join(parts))
  for key, spec in want_flat.items():
    if tuple(got[key].shape) != tuple(spec.shape):
      raise UserError(f"{fmt} checkpoint {os.fspath(path)}: parameter {key} has shape "
                      f"{tuple(got[key].shape)}, the model expects {tuple(spec.shape)}")
  params = traverse_util.unflatten_dict(
      {tuple(k.split("/")): np.asarray(v, np.float32) for k, v in got.items()})
  logger.info("loaded %s checkpoint %s", fmt, os.fspath(path))
  return vit.scan_params(params) if cfg.get("scan") else params
