"""Where a job runs: device choice, torchrun placement, NVML readings and memory probes."""
