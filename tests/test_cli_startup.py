"""The `etcjax` command starts without JAX, TensorFlow or the attacks where it needs none.

Behavioural checks (which modules a fresh process loaded), not timings. The owner
commands also run here with forked worker processes, which the in-process tests (JAX is
loaded there, so etcjax.parallel uses threads) do not reach; their outputs must be the
bytes of the one-worker outputs.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from etcjax import cli, parallel
from etcjax.commands import privacy

HEAVY = ("jax", "tensorflow", "etcjax.attacks", "flax")

_PROBE = """
import json, sys
from etcjax import cli
cli.build_parser()
after_parser = [m for m in {heavy!r} if m in sys.modules]
codes = [cli.main(argv) for argv in json.loads(sys.argv[1])]
from etcjax import parallel
print(json.dumps({{"after_parser": after_parser, "codes": codes,
                  "pool": parallel.pool_kind(),
                  "after_commands": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(commands: list[list[str]]) -> dict:
  env = {k: v for k, v in os.environ.items() if k != parallel.POOL_ENV}
  r = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), json.dumps(commands)],
                     capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.splitlines()[-1])


def make_images(folder, count: int) -> None:
  rng = np.random.default_rng(0)
  for i in range(count):
    sub = folder / f"c{i % 3}"
    sub.mkdir(parents=True, exist_ok=True)
    h, w = ((16, 16), (32, 48), (48, 32))[i % 3]
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img.save(sub / f"{i:03d}.png") if i % 2 else img.save(sub / f"{i:03d}.jpg", quality=90)


def tree_bytes(folder) -> dict:
  return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(folder) for f in fs}


def test_parser_and_keygen_import_no_jax(tmp_path):
  doc = probe([["keygen", str(tmp_path / "k.key")]])
  assert doc["codes"] == [0]
  assert doc["after_parser"] == [] and doc["after_commands"] == []


def test_owner_commands_with_worker_processes_match_one_worker(tmp_path, capsys):
  src = tmp_path / "in"
  make_images(src, 2 * parallel.MIN_ITEMS_PER_WORKER + 6)  # enough for two workers
  key = str(tmp_path / "k.key")
  assert cli.main(["keygen", key]) == 0
  runs = {}
  for jobs in ("2", "1"):
    runs[jobs] = [
        ["encrypt", "--key", key, str(src), "--out", str(tmp_path / f"png{jobs}"),
         "--jobs", jobs],
        ["encrypt", "--key", key, str(src), "--out", str(tmp_path / f"jpg{jobs}"),
         "--format", "jpeg", "--jobs", jobs],
        ["decrypt", "--key", key, str(tmp_path / f"png{jobs}"), "--out",
         str(tmp_path / f"dec{jobs}"), "--jobs", jobs],
        ["compress-stats", str(src), "--key", key, "--json", str(tmp_path / f"s{jobs}.json"),
         "--jobs", jobs],
    ]
  doc = probe(runs["2"])  # a fresh process: forked workers
  assert doc["pool"] == "process" and doc["codes"] == [0, 0, 0, 0]
  assert doc["after_commands"] == []
  for argv in runs["1"]:  # here, in this process
    assert cli.main(argv) == 0
  capsys.readouterr()
  for name in ("png", "jpg", "dec"):
    a, b = tree_bytes(tmp_path / f"{name}2"), tree_bytes(tmp_path / f"{name}1")
    assert len(a) > 2 * parallel.MIN_ITEMS_PER_WORKER and a == b, name
  assert (json.loads((tmp_path / "s2.json").read_text())
          == json.loads((tmp_path / "s1.json").read_text()))
  for rel in tree_bytes(tmp_path / "dec1"):  # the PNG inputs come back exactly
    plain = src / rel
    if plain.exists():
      np.testing.assert_array_equal(np.asarray(Image.open(plain).convert("RGB")),
                                    np.asarray(Image.open(tmp_path / "dec1" / rel)))


def test_privacy_parser_choices_match_the_attacks():
  from etcjax.attacks import itn
  from etcjax.attacks import run as attack_run
  from etcjax.privacy_report import REPORT_ATTACKS, attack_label

  assert privacy.SCHEMES == attack_run.SCHEMES
  assert privacy.ATTACKS == attack_run.ATTACKS
  assert privacy.FR_MODES == attack_run.FR_MODES
  assert privacy.REPORT_ATTACK_LABELS == tuple(attack_label(a, m) for a, m in REPORT_ATTACKS)
  assert privacy.DEFAULT_ATTACK_STEPS == itn.TrainConfig.steps
