#!/usr/bin/env bash
# Sourced by the GPU launchers (local.sh on a machine with nvidia-smi, slurm_gpu.sbatch):
# adds XLA's GPU flags that help this workload to XLA_FLAGS, keeping every flag the caller
# already set (a flag named there is not added again, so the caller's value wins).
#   --xla_gpu_enable_latency_hiding_scheduler=true  schedules the data-parallel gradient
#       all-reduce / FSDP all-gathers to overlap with compute (JAX GPU performance tips);
#       no effect on one GPU.
# Source it, do not run it:  source launch/xla_gpu_env.sh
_locca_xla_gpu_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true
)
for _locca_flag in "${_locca_xla_gpu_flags[@]}"; do
  if [[ " ${XLA_FLAGS:-} " != *" ${_locca_flag%%=*}="* ]]; then
    XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }${_locca_flag}"
  fi
done
export XLA_FLAGS
unset _locca_flag _locca_xla_gpu_flags
