r"""The demo: small models on the embedded digits dataset, plain and EtC, on a CPU.

    python -m etcjax.main --config configs/demo.py:etc --workdir runs/demo_etc \
        --config.key_file=demo.key

Variants (comma-separated): "plain" (default) or "etc"; "convmixer" (default) or
"resnet"; "tiny" (a few steps, for tests). The recipe is `etcjax.config.demo_recipe`:
scikit-learn's digits as coloured 32x32 images, EtC with 8x8 blocks, a small ConvMixer
(patch 4) or a narrow ResNet-18, AdamW with a one-cycle schedule for 10 epochs.

`python -m etcjax.demo` (`make demo`) runs ConvMixer plain, ConvMixer EtC and ResNet EtC
and writes a report; `etcjax/demo.py` states the accuracies to expect.
"""

from etcjax import config as config_lib


def get_config(arg: str | None = None):
  return config_lib.demo_recipe(
      config_lib.parse_variant(arg, ("plain", "etc", "convmixer", "resnet", "tiny")))
