"""Pre-training entry point (thin): flags -> jax.distributed -> x2vlm_jax.train_lib.

  python train.py --config=configs/tiny.py --workdir=/tmp/run
  python train.py --config=configs/pretrain_base_4m.py --workdir=gs://... \
      --config.optim.lr=5e-5 --config.train.total_steps=1000

Multi-host: `jax.distributed.initialize()` runs before anything touches the devices, with
--coordinator_address/--num_processes/--process_id when given, else from the environment (TPU
pods, SLURM, Open MPI, GKE). See docs/training.md.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, metrics).")
_ALLOW_CHANGE = flags.DEFINE_bool(
  "allow_config_change", False, "Resume even if critical settings differ from the checkpoint."
)
_PROFILE = flags.DEFINE_string(
  "profile_steps",
  "",
  "'first,last': JAX profiler trace of these "
  "steps into <workdir>/profile (overrides config.train.profile_steps).",
)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DIST = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "auto: initialise jax.distributed when flags or a cluster environment "
  "ask for it; on: always; off: never (single process).",
)
_CPU_COLLECTIVES = flags.DEFINE_string(
  "cpu_collectives", "", "CPU collectives implementation for multi-process CPU runs (e.g. 'gloo')."
)
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed() -> None:
  """jax.distributed.initialize from flags or the environment, before any device use."""
  import os  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  explicit = any(f is not None for f in (_COORD.value, _NPROC.value, _PID.value))
  cluster_env = any(
    v in os.environ
    for v in (
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
      "JAX_COORDINATOR_ADDRESS",
      "TPU_WORKER_HOSTNAMES",
      "MEGASCALE_COORDINATOR_ADDRESS",
    )
  )
  if _DIST.value == "off" or (_DIST.value == "auto" and not explicit and not cluster_env):
    return
  if explicit:
    jax.distributed.initialize(
      coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value
    )
  else:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _init_distributed()
  from x2vlm_jax import cpu_host, train_lib  # pylint: disable=g-import-not-at-top

  # Before anything touches a device: on CPU, steps stop re-faulting their memory (cpu_host).
  t = _CONFIG.value.train
  cpu_host.setup(bool(t.get("cpu_host_tuning", True)), bool(t.get("cpu_sync_dispatch", False)))

  train_lib.train_and_evaluate(
    _CONFIG.value,
    _WORKDIR.value,
    allow_config_change=_ALLOW_CHANGE.value,
    profile_steps=_PROFILE.value,
  )


if __name__ == "__main__":
  from x2vlm_jax import cli  # light: absl only (jax is imported after the flags are read)

  app.run(main, flags_parser=cli.parse_flags)
