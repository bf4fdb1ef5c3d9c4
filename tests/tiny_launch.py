"""The tiny pre-training config of the launch tests (test_cloud_paths, test_progress_eta), set up
so that their runs share one compiled step: the same mesh and batch, a fixed schedule length
(the schedule is part of the step program) and one persistent compilation cache per session."""

from configs import tiny


def config(tmp_path_factory, total_steps: int, **train):
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # the 8 simulated devices
  c.batch.region_max_images = 4  # divisible by the 4 batch shards
  c.optim.total_steps = 64  # fixed, so runs of any length compile the same step
  c.train.total_steps = total_steps
  c.train.compilation_cache_dir = str(tmp_path_factory.getbasetemp() / "tiny_launch_xla_cache")
  for k, v in train.items():
    c.train[k] = v
  return c
