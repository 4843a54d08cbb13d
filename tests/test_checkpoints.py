"""Pretrained-checkpoint import: files written in each upstream layout from a fresh model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util
from safetensors.numpy import save_file

from etcjax import checkpoints
from etcjax.errors import UserError
from etcjax.models import vit

HEADS = 2


def _config(**kw):
  return dict(vit.get_config("ViT-tiny-test"), representation_size=24, **kw)


def _model(num_classes=5, **kw):
  return vit.VisionTransformer(num_classes=num_classes, **_config(**kw))


def _images(n=2, size=16):
  return jax.random.uniform(jax.random.key(7), (n, size, size, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def params():
  """A tiny ViT with pre_logits; every leaf randomised so a zero head hides nothing."""
  p = _model().init(jax.random.key(0), _images(), train=False)["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: np.asarray(x + 0.2 * rng.standard_normal(x.shape), np.float32), p)


@pytest.fixture(scope="module")
def logits(params):
  return np.asarray(_model().apply({"params": params}, _images()))


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# --- writers for the upstream layouts (what each project's own save code produces) ---------

_PRE_LINEN = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
              "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
              "MlpBlock_0": "MlpBlock_3"}


def write_vision_transformer_npz(path, params):
  """vision_transformer's i21k files: pre-linen module numbers, posemb in posembed_input."""
  flat = {}
  for key, value in _flat(params).items():
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      parts[2] = _PRE_LINEN[parts[2]]
    flat["/".join(parts)] = value
  np.savez(path, **flat)
  return flat


def write_big_vision_npz(path, params):
  """big_vision: `params/` prefix, scanned blocks, posemb at top level added before [cls]."""
  tree = vit.scan_params(params)
  tree = jax.tree.map(np.asarray, tree)
  encoder = dict(tree["Transformer"])
  posemb = encoder.pop("posembed_input")["pos_embedding"]
  tree = dict(tree, Transformer=encoder, pos_embedding=posemb[:, 1:],
              cls=tree["cls"] + posemb[:, :1])
  flat = {"params/" + k: v for k, v in _flat(tree).items()}
  flat["opt/state/count"] = np.array(3)  # optimizer state beside the params is ignored
  np.savez(path, **flat)
  return flat


def _torch_linear(kernel):
  return np.ascontiguousarray(np.asarray(kernel).T)


def timm_state_dict(params):
  """timm's VisionTransformer.state_dict() (PyTorch layouts, fused qkv)."""
  p = jax.tree.map(np.asarray, params)
  sd = {"cls_token": p["cls"], "pos_embed": p["Transformer"]["posembed_input"]["pos_embedding"],
        "patch_embed.proj.weight": np.transpose(p["embedding"]["kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": p["embedding"]["bias"],
        "norm.weight": p["Transformer"]["encoder_norm"]["scale"],
        "norm.bias": p["Transformer"]["encoder_norm"]["bias"],
        "pre_logits.fc.weight": _torch_linear(p["pre_logits"]["kernel"]),
        "pre_logits.fc.bias": p["pre_logits"]["bias"],
        "head.weight": _torch_linear(p["head"]["kernel"]), "head.bias": p["head"]["bias"]}
  i = 0
  while f"encoderblock_{i}" in p["Transformer"]:
    b = p["Transformer"][f"encoderblock_{i}"]
    mha = b["MultiHeadDotProductAttention_0"]
    pre = f"blocks.{i}."
    sd[pre + "norm1.weight"], sd[pre + "norm1.bias"] = (b["LayerNorm_0"]["scale"],
                                                        b["LayerNorm_0"]["bias"])
    d = mha["out"]["kernel"].shape[-1]
    sd[pre + "attn.qkv.weight"] = np.concatenate(
        [mha[n]["kernel"].reshape(d, d).T for n in ("query", "key", "value")])
    sd[pre + "attn.qkv.bias"] = np.concatenate(
        [mha[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[pre + "attn.proj.weight"] = np.ascontiguousarray(mha["out"]["kernel"].reshape(-1, d).T)
    sd[pre + "attn.proj.bias"] = mha["out"]["bias"]
    sd[pre + "norm2.weight"], sd[pre + "norm2.bias"] = (b["LayerNorm_1"]["scale"],
                                                        b["LayerNorm_1"]["bias"])
    for r, name in enumerate(("fc1", "fc2")):
      sd[pre + f"mlp.{name}.weight"] = _torch_linear(b["MlpBlock_0"][f"Dense_{r}"]["kernel"])
      sd[pre + f"mlp.{name}.bias"] = b["MlpBlock_0"][f"Dense_{r}"]["bias"]
    i += 1
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def hf_state_dict(params):
  """transformers' ViTForImageClassification.state_dict() (separate q/k/v, `vit.` prefix)."""
  sd = timm_state_dict(params)
  out = {"vit.embeddings.cls_token": sd.pop("cls_token"),
         "vit.embeddings.position_embeddings": sd.pop("pos_embed"),
         "vit.embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
         "vit.embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
         "vit.layernorm.weight": sd.pop("norm.weight"), "vit.layernorm.bias": sd.pop("norm.bias"),
         "vit.pooler.dense.weight": sd.pop("pre_logits.fc.weight"),
         "vit.pooler.dense.bias": sd.pop("pre_logits.fc.bias"),
         "classifier.weight": sd.pop("head.weight"), "classifier.bias": sd.pop("head.bias")}
  rename = {"norm1": "layernorm_before", "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense"}
  for key, value in sd.items():
    i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
    pre = f"vit.encoder.layer.{i}."
    if rest.startswith("attn.qkv."):
      kind = rest.rsplit(".", 1)[1]
      for name, part in zip(("query", "key", "value"), np.split(value, 3), strict=True):
        out[pre + f"attention.attention.{name}.{kind}"] = np.ascontiguousarray(part)
      continue
    module, kind = rest.rsplit(".", 1)
    out[pre + f"{rename[module]}.{kind}"] = value
  return out


def timm_forward_numpy(sd, images_nhwc, num_heads):
  """timm's ViT forward pass written directly against the state dict (independent check)."""
  x = np.transpose(np.asarray(images_nhwc, np.float64), (0, 3, 1, 2))
  w = sd["patch_embed.proj.weight"]
  d, _, p, _ = w.shape
  n, c, h, wd = x.shape
  patches = x.reshape(n, c, h // p, p, wd // p, p)
  tok = np.einsum("nchiwj,dcij->nhwd", patches, w).reshape(n, -1, d) + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (n, 1, d)), tok], 1) + sd["pos_embed"]

  def ln(v, pre):
    mu = v.mean(-1, keepdims=True)
    var = v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[pre + ".weight"] + sd[pre + ".bias"]

  def lin(v, pre):
    return v @ sd[pre + ".weight"].T + sd[pre + ".bias"]

  i, hd = 0, d // num_heads
  while f"blocks.{i}.norm1.weight" in sd:
    b = f"blocks.{i}."
    t = x.shape[1]
    qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(n, t, 3, num_heads, hd)
    q, k, v = np.transpose(qkv, (2, 0, 3, 1, 4))
    a = q @ np.swapaxes(k, -1, -2) * hd ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.transpose(a @ v, (0, 2, 1, 3)).reshape(n, t, d)
    x = x + lin(o, b + "attn.proj")
    y = lin(ln(x, b + "norm2"), b + "mlp.fc1")
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    x = x + lin(y, b + "mlp.fc2")
    i += 1
  x = ln(x, "norm")[:, 0]
  x = np.tanh(lin(x, "pre_logits.fc"))
  return lin(x, "head")


# --- round trips -----------------------------------------------------------------------------


def _load(path, num_classes=5, image_size=16, **kw):
  return checkpoints.load_pretrained(path, _config(**kw), image_size, num_classes)


def test_vision_transformer_npz_round_trip(tmp_path, params, logits):
  path = tmp_path / "ViT-tiny.npz"
  flat = write_vision_transformer_npz(path, params)
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in flat
  assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape \
      == (32, HEADS, 16)
  assert checkpoints.read_vit(path, HEADS)[0] == "vision_transformer"
  loaded = _load(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  np.testing.assert_allclose(_model().apply({"params": loaded}, _images()), logits, rtol=1e-6)


def test_opt_target_prefix_is_accepted(tmp_path, params, logits):
  flat = {"opt/target/" + k: v for k, v in _flat(params).items()}
  np.savez(tmp_path / "ft.npz", **flat)
  loaded = _load(tmp_path / "ft.npz")
  np.testing.assert_allclose(_model().apply({"params": loaded}, _images()), logits, rtol=1e-6)


def test_big_vision_scanned_npz_round_trip(tmp_path, params, logits):
  path = tmp_path / "bv.npz"
  flat = write_big_vision_npz(path, params)
  assert flat["params/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)
  assert flat["params/pos_embedding"].shape == (1, 16, 32)
  assert checkpoints.read_vit(path, HEADS)[0] == "big_vision"
  loaded = _load(path)
  np.testing.assert_allclose(_model().apply({"params": loaded}, _images()), logits,
                             rtol=1e-5, atol=1e-5)
  scanned = _load(path, scan=True)
  assert scanned["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == \
      (2, 32, 64)
  np.testing.assert_allclose(_model(scan=True).apply({"params": scanned}, _images()), logits,
                             rtol=1e-5, atol=1e-5)


def test_timm_layout_matches_an_independent_forward_pass(params, logits):
  sd = timm_state_dict(params)
  assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
  assert sd["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
  np.testing.assert_allclose(timm_forward_numpy(sd, _images(), HEADS), logits,
                             rtol=2e-4, atol=2e-4)


def test_timm_safetensors_round_trip(tmp_path, params, logits):
  path = tmp_path / "model.safetensors"
  save_file(timm_state_dict(params), str(path))
  assert checkpoints.read_vit(path, HEADS)[0] == "timm"
  loaded = _load(path)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loaded,
               jax.tree.map(np.asarray, params))
  np.testing.assert_allclose(_model().apply({"params": loaded}, _images()), logits, rtol=1e-5)


def test_huggingface_safetensors_round_trip(tmp_path, params, logits):
  path = tmp_path / "hf.safetensors"
  sd = hf_state_dict(params)
  assert sd["vit.encoder.layer.1.attention.attention.value.weight"].shape == (32, 32)
  save_file(sd, str(path))
  assert checkpoints.read_vit(path, HEADS)[0] == "huggingface"
  loaded = _load(path)
  np.testing.assert_allclose(_model().apply({"params": loaded}, _images()), logits,
                             rtol=1e-5, atol=1e-6)
  # ViTModel files (no `vit.` prefix, no classifier): the head starts at zero.
  bare = {k.removeprefix("vit."): v for k, v in sd.items() if not k.startswith("classifier")}
  save_file(bare, str(tmp_path / "bare.safetensors"))
  loaded = _load(tmp_path / "bare.safetensors")
  assert not np.any(loaded["head"]["kernel"])


# --- adaptation ------------------------------------------------------------------------------


def test_head_reinitialised_for_other_class_count(tmp_path, params):
  path = tmp_path / "v.npz"
  write_vision_transformer_npz(path, params)
  loaded = _load(path, num_classes=3)
  assert loaded["head"]["kernel"].shape == (24, 3)
  assert not np.any(loaded["head"]["kernel"]) and not np.any(loaded["head"]["bias"])
  np.testing.assert_array_equal(loaded["pre_logits"]["kernel"], params["pre_logits"]["kernel"])
  out = vit.VisionTransformer(num_classes=3, **_config()).apply({"params": loaded}, _images())
  np.testing.assert_array_equal(out, 0.0)


def test_pre_logits_dropped_unless_requested(tmp_path, params):
  path = tmp_path / "v.npz"
  write_vision_transformer_npz(path, params)
  cfg = dict(vit.get_config("ViT-tiny-test"))
  loaded = checkpoints.load_pretrained(path, cfg, 16, 5)
  assert "pre_logits" not in loaded
  assert loaded["head"]["kernel"].shape == (32, 5) and not np.any(loaded["head"]["kernel"])
  vit.VisionTransformer(num_classes=5, **cfg).apply({"params": loaded}, _images())
  # Asking for pre_logits that the file does not have is an error, not a silent random layer.
  np.savez(tmp_path / "nopre.npz", **{k: v for k, v in _flat(params).items()
                                      if not k.startswith("pre_logits")})
  with pytest.raises(UserError, match="no pre_logits"):
    _load(tmp_path / "nopre.npz")


def test_posemb_resampled_for_larger_images(tmp_path, params):
  path = tmp_path / "v.npz"
  write_vision_transformer_npz(path, params)
  loaded = _load(path, image_size=32)
  old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  new = loaded["Transformer"]["posembed_input"]["pos_embedding"]
  assert new.shape == (1, 1 + 8 * 8, 32)
  np.testing.assert_array_equal(new[:, 0], old[:, 0])  # class token kept
  grid_old, grid_new = old[0, 1:].reshape(4, 4, 32), new[0, 1:].reshape(8, 8, 32)
  # Corner-aligned bilinear: corners are kept exactly.
  for (a, b), (c, d) in [((0, 0), (0, 0)), ((0, 3), (0, 7)), ((3, 3), (7, 7))]:
    np.testing.assert_allclose(grid_new[c, d], grid_old[a, b], rtol=1e-5, atol=1e-6)
  out = _model().apply({"params": loaded}, _images(size=32))
  assert out.shape == (2, 5)
  loaded_rect = _load(path, image_size=(16, 24))
  assert loaded_rect["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 25, 32)


def test_resample_posemb_identity_and_linear_exactness():
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 9, 4)).astype(np.float32)
  same = checkpoints.resample_posemb(posemb, (3, 3))
  np.testing.assert_array_equal(same, posemb)
  assert same is not posemb
  # A grid that is linear in (row, col) stays linear: bilinear reproduces it exactly.
  r, c = np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij")
  lin = (2 * r + 5 * c)[..., None] * np.ones(4)
  pe = np.concatenate([np.full((1, 1, 4), 7.0), lin.reshape(1, 9, 4)], 1).astype(np.float32)
  out = checkpoints.resample_posemb(pe, (5, 7))
  r2, c2 = np.meshgrid(np.linspace(0, 2, 5), np.linspace(0, 2, 7), indexing="ij")
  np.testing.assert_allclose(out[0, 1:, 0], (2 * r2 + 5 * c2).ravel(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[0, 0], 7.0)
  gap = checkpoints.resample_posemb(lin.reshape(1, 9, 4).astype(np.float32), (6, 6), 0)
  assert gap.shape == (1, 36, 4)


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(UserError, match="not found: .*nope.npz"):
    _load(tmp_path / "nope.npz")


def test_not_a_vit_checkpoint(tmp_path):
  np.savez(tmp_path / "resnet.npz", **{"conv_root/kernel": np.zeros((7, 7, 3, 64))})
  with pytest.raises(UserError, match="not a ViT checkpoint"):
    _load(tmp_path / "resnet.npz")
  save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, str(tmp_path / "r.safetensors"))
  with pytest.raises(UserError, match="not a ViT checkpoint"):
    _load(tmp_path / "r.safetensors")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(UserError, match="not an .npz or .safetensors"):
    _load(tmp_path / "notes.txt")
  (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(UserError):
    _load(tmp_path / "broken.npz")


def test_shape_mismatch_names_parameter_and_shapes(tmp_path, params):
  path = tmp_path / "v.npz"
  write_vision_transformer_npz(path, params)
  with pytest.raises(UserError, match=r"parameter Transformer/encoderblock_0/MlpBlock_0/Dense_0/"
                     r"bias has shape \(64,\), the model expects \(48,\)"):
    _load(path, mlp_dim=48)
  with pytest.raises(UserError, match="unexpected Transformer/encoderblock_1"):
    _load(path, num_layers=1)
  with pytest.raises(UserError, match="classifier='gap'"):
    _load(path, classifier="gap")


def test_attention_pool_timm_checkpoint_is_rejected(tmp_path, params):
  sd = timm_state_dict(params)
  sd["fc_norm.weight"] = np.ones(32, np.float32)
  save_file(sd, str(tmp_path / "avg.safetensors"))
  with pytest.raises(UserError, match="fc_norm"):
    _load(tmp_path / "avg.safetensors")


def test_vit_module_wrapper(tmp_path, params, logits):
  path = tmp_path / "v.npz"
  write_vision_transformer_npz(path, params)
  loaded = vit.load_pretrained(str(path), _config(), 16, 5)
  np.testing.assert_allclose(_model().apply({"params": loaded}, jnp.asarray(_images())), logits,
                             rtol=1e-6)
