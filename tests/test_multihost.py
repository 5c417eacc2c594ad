"""Multi-host training on localhost: 2 processes × 2 CPU devices, JAX CPU collectives (gloo).

The slow test is the acceptance test of `locca_jax.distributed` + the trainer across processes;
the fast ones check how `distributed.plan` decides between explicit, cluster and single process.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from locca_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (("data", 1), ("fsdp", 4), ("tensor", 1))  # params sharded across both processes
# Adafactor's first updates are ~sign(g): with eps=1e-30 a gradient of +-1e-12 (reduction order:
# gloo across processes vs in-process) flips a full-size update of a parameter. A larger eps
# makes updates continuous in g, so comparing parameters tests multi-host, not that (as in
# test_train_step.py). Losses agree either way.
TWEAKS = 'config.optax.eps = 1e-4; config.optax.dtype_momentum = "float32"'


def test_plan_is_single_process_without_coordinator_or_cluster():
  assert distributed.plan(environ={}).mode == "single"
  assert distributed.plan(environ={"LOCCA_NUM_PROCESSES": "1"}).mode == "single"


def test_plan_takes_arguments_over_environment():
  environ = {"LOCCA_COORDINATOR_ADDRESS": "envhost:1", "LOCCA_NUM_PROCESSES": "8",
             "LOCCA_PROCESS_ID": "7"}
  p = distributed.plan("10.0.0.2:12355", 4, 3, environ=environ)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      "explicit", "10.0.0.2:12355", 4, 3)
  p = distributed.plan(environ=environ)
  assert (p.coordinator_address, p.num_processes, p.process_id) == ("envhost:1", 8, 7)


@pytest.mark.parametrize("args, message", [
    (("localhost:1", 2, None), "missing \\['process_id'\\]"),
    (("localhost:1", 2, 2), "process_id=2 must be in \\[0, num_processes=2\\)"),
    (("localhost", 2, 0), "expected host:port"),
])
def test_plan_rejects_incomplete_or_inconsistent_settings(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.plan(*args, environ={})


def test_plan_defers_to_jax_for_multi_task_slurm_steps_and_tpu_pods():
  slurm = dict(SLURM_JOB_ID="17", SLURM_STEP_NODELIST="gpu[001-002]", SLURM_NTASKS="16",
               SLURM_PROCID="5", SLURM_LOCALID="5")
  p = distributed.plan(environ=slurm)
  assert (p.mode, p.local_device_ids) == ("cluster", None)  # JAX: task i -> GPU i of the node
  p = distributed.plan(environ=dict(slurm, CUDA_VISIBLE_DEVICES="5"))
  assert p.local_device_ids == (0,)  # SLURM bound one GPU to the task: it is device 0
  assert distributed.plan(environ=dict(slurm, SLURM_NTASKS="1")).mode == "single"
  assert distributed.plan(environ=dict(slurm, LOCCA_DISTRIBUTED="off")).mode == "single"
  assert distributed.plan(environ={"LOCCA_DISTRIBUTED": "auto"}).mode == "cluster"
  assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}).mode == "cluster"  # GKE
  with pytest.raises(ValueError, match="LOCCA_DISTRIBUTED"):
    distributed.plan(environ={"LOCCA_DISTRIBUTED": "yes"})


# --- 2 processes on localhost --------------------------------------------------------------

# Segment 1: through the Python API, coordinator from the LOCCA_* environment.
_API_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from locca_jax import distributed
    distributed.initialize()
    import jax
    from locca_jax import sharding, train
    from tests.conftest import tiny_config

    config = tiny_config({data_dir!r})
    config.mesh = {mesh!r}
    {tweaks}
    mesh = sharding.make_mesh(config.mesh)
    # Global batch rows [0, 4) live on process 0's devices, [4, 8) on process 1's.
    assert [d.process_index for d in mesh.devices.flat] == [0, 0, 1, 1], mesh.devices
    train.train_and_evaluate(config, {workdir!r}, steps_this_run=3)
    print("done", jax.process_index(), jax.process_count(), jax.device_count())
""")

# Segment 2: the command line, coordinator from --coordinator_address/--num_processes/...
_CONFIG_FILE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.conftest import tiny_config

    def get_config():
      config = tiny_config({data_dir!r})
      config.mesh = {mesh!r}
      {tweaks}
      return config
""")

# The 1-process, 4-device reference and the cross-process-count checks.
_REFERENCE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from locca_jax import checkpoint, sharding, train, train_step
    from locca_jax.data import input_pipeline
    from locca_jax.models import locca
    from tests.conftest import tiny_config

    config = tiny_config({data_dir!r})
    config.mesh = {mesh!r}
    {tweaks}
    assert jax.process_count() == 1 and jax.device_count() == 4
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = input_pipeline.make_tokenizer(config.input.tokenizer)
    model = locca.make_model(config.model, tokenizer.vocab_size, config.input.seq_len)
    spec = train_step.make_state_spec(model, config, mesh)
    step_fn = train_step.make_train_step(model, spec.tx, config, mesh, spec.shardings)
    # The global batches of the 2-process run: process 0's local batch (its half of the split,
    # its shuffle), then process 1's.
    shards = [input_pipeline.make_train_iterator(config, tokenizer, process_index=i,
                                                 process_count=2) for i in range(2)]
    state, losses = spec.init(), []
    for _ in range(config.total_steps):
      parts = [next(it) for it in shards]
      batch = {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["train/loss"]))

    # The state the 2 processes wrote together restores into 1 process (same mesh shape).
    ckpt = checkpoint.Checkpointer({ckpt_dir!r}, every=config.ckpt_every,
                                   keep=config.keep_ckpts)
    restored = ckpt.restore(config.total_steps, spec.abstract)
    ckpt.close()
    params_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(restored["params"]), jax.tree_util.tree_leaves(state["params"])))

    # Resuming the whole run with 1 process must fail: the input positions are per process.
    config.total_steps += 3
    try:
      train.train_and_evaluate(config, {workdir!r})
      resume_error = None
    except Exception as e:  # pylint: disable=broad-except
      resume_error = f"{{type(e).__name__}}: {{e}}"
    print(json.dumps(dict(losses=losses, params_diff=params_diff, step=int(restored["step"]),
                          resume_error=resume_error)))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  """CPU with `devices` devices. XLA's backend optimizations off: compiling twice as fast
  matters more here than the speed of the code (every run compiles with the same flags)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCCA_", "SLURM_"))}
  env.update(XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _run_processes(commands, envs, log_prefix, timeout=400):
  """Starts one process per command, waits for all; kills the rest as soon as one fails."""
  # pylint: disable-next=consider-using-with
  logs = [open(f"{log_prefix}.{i}.log", "w+") for i in range(len(commands))]
  procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
           for cmd, env, log in zip(commands, envs, logs)]
  deadline, timed_out = time.monotonic() + timeout, False
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for i, p in enumerate(procs):
    why = f"killed after {timeout} s" if timed_out else f"exited with {p.returncode}"
    assert p.returncode == 0, f"process {i} {why}:\n{outputs[i][-5000:]}"
  return outputs


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_interrupted_and_resumed_match_one_process_on_the_same_batches(
    shapes_data_dir, tmp_path):
  """2 processes × 2 CPU devices train tiny LocCa for 3 steps, checkpoint and stop, restart
  and resume to step 6; the per-step losses equal those of 1 process × 4 devices.

  Which batches the reference sees: each of the 2 processes reads its own half of the split
  (`tfds.split_for_jax_process`) with its own shuffle and augmentation seeds, and the global
  batch is process 0's 4 examples followed by process 1's (the mesh puts process 0's devices
  first). A 1-process run of the trainer would read the whole split in another order, so its
  losses would differ for reasons unrelated to multi-host correctness. The reference therefore
  runs the same model / optimizer / train step on the same 4-device mesh shape, but builds each
  global batch from the two per-process input iterators (`process_index=0, 1` of 2) and
  concatenates them in process order: same examples, same global order, one process. Equal
  losses at all 6 steps then show, at once, that the global batch is assembled correctly across
  processes, that the cooperative checkpoint + per-process iterator positions resume exactly
  (steps 4-6 run after a restart), and that the gloo collectives compute what in-process ones
  do. The reference also restores the 2-process checkpoint of step 6 into its 1-process mesh
  (same params), and checks that resuming the run with 1 process fails clearly (the tf.data
  positions were saved per process). Steps 1-3 go through the Python API with the coordinator
  in LOCCA_* variables, steps 4-6 through `python -m locca_jax.train` and its flags.
  """
  workdir = str(tmp_path / "workdir")
  fmt = dict(repo=REPO, data_dir=shapes_data_dir, mesh=MESH, tweaks=TWEAKS, workdir=workdir,
             ckpt_dir=os.path.join(workdir, "checkpoints"))
  records = _two_process_run_with_restart(fmt, tmp_path)

  result = subprocess.run([sys.executable, "-c", _REFERENCE.format(**fmt)], env=_env(4),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  ref = json.loads(result.stdout.strip().splitlines()[-1])

  losses = [r["train/loss"] for r in records]
  np.testing.assert_allclose(losses, ref["losses"], rtol=1e-5)
  assert losses[-1] < losses[0]  # training moves: not a comparison of two constants
  assert ref["step"] == 6 and ref["params_diff"] < 1e-5
  assert ref["resume_error"] is not None
  assert "process_0_of_1" in ref["resume_error"] and "process count" in ref["resume_error"]


def _two_process_run_with_restart(fmt, tmp_path):
  """Steps 1-3 (Python API, LOCCA_* environment), stop; steps 4-6 (command line flags)."""
  workdir = fmt["workdir"]
  port = _free_port()
  envs = [dict(_env(2), LOCCA_COORDINATOR_ADDRESS=f"localhost:{port}", LOCCA_NUM_PROCESSES="2",
               LOCCA_PROCESS_ID=str(i)) for i in range(2)]
  code = _API_WORKER.format(**fmt)
  out = _run_processes([[sys.executable, "-c", code]] * 2, envs, str(tmp_path / "seg1"))
  assert "done 0 2 4" in out[0] and "done 1 2 4" in out[1]
  # Checkpoint 3: one iterator position per process next to the cooperatively written state.
  data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", "3", "data")))
  assert "process_0_of_2.index" in data_files and "process_1_of_2.index" in data_files
  assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3]

  config_file = tmp_path / "tiny_mesh4.py"
  config_file.write_text(_CONFIG_FILE.format(**fmt))
  port = _free_port()
  commands = [[sys.executable, "-m", "locca_jax.train", f"--config={config_file}",
               f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}"] for i in range(2)]
  out = _run_processes(commands, [_env(2)] * 2, str(tmp_path / "seg2"))
  assert "step 6/6" in out[0] and "step 6/6" not in out[1]  # progress lines: process 0 only
  records = _metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one writer, resumed at 4
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps == [3, 6]
  return records
