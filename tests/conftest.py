"""Test set-up: 8 simulated CPU devices (must be set before JAX initialises).

The suite runs tiny models, so XLA's slow backend optimisations buy nothing but compile time on
the 2-core CI machine; they are switched off for the whole session (subprocesses inherit it).
"""

import os

_XLA_TEST_FLAGS = (
  "--xla_force_host_platform_device_count=8 "
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("XLA_FLAGS", _XLA_TEST_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
