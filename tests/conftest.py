"""Test setup: 8 simulated CPU devices, float32 matmuls at full precision, tiny HF models built locally."""

import os

# Tiny models: compiling, not running, is what a test spends its time on, and LLVM's optimisation of the
# CPU code is most of a compile. Level 0 cuts compile-bound test files' time by about a third; the runs a test
# compares with each other (resume, several processes) all inherit the same flags.
# On a GPU or TPU (JAX_PLATFORMS=cuda or tpu, for the kernel tests) the flag is left out.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The simulated devices of one process meet in each collective; XLA aborts the process when one of them is 40 s
# late, which a 2-core machine running the suite beside several test processes reached (a 4-device run, killed
# in an all-reduce). Ten minutes still catches a real deadlock.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + (" --xla_backend_optimization_level=0"
                              " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                              if os.environ["JAX_PLATFORMS"] == "cpu" else ""))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled steps are reused across tests and the subprocesses they start (compiling dominates test time).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxkd",
                                                               "jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# pytest-xdist (--dist loadfile, --no-loadscope-reorder in pyproject) hands out whole files in collection order. A long
# file handed out last keeps one worker busy while the other idles, so the longest go first, as `pytest --durations=0`
# measured them with a cold compilation cache (5.5 minutes down to 45 s each), and the many short files fill the end.
SLOWEST_FILES = ("test_resilience.py", "test_scripts.py", "test_multiprocess.py", "test_hidden.py", "test_lora.py",
                 "test_on_policy.py", "test_step.py", "test_train.py", "test_teacher_cache.py", "test_models.py",
                 "test_colab.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def hf_factory(tmp_path_factory):
  """make(name, hf_config) -> folder of a random tiny transformers model saved with save_pretrained."""
  from tests import hf_models  # pylint: disable=import-outside-toplevel

  cache = {}

  def make(name, config=None, **kwargs):
    if name not in cache:
      cache[name] = hf_models.save_tiny(tmp_path_factory.mktemp(name), config or hf_models.CONFIGS[name],
                                        **kwargs)
    return cache[name]

  return make


@pytest.fixture(scope="session")
def tok():
  """The bundled tokenizer (the tiny models' and the data tests')."""
  from jaxkd.data import TOKENIZER_DIR, load_tokenizer  # pylint: disable=import-outside-toplevel

  return load_tokenizer(TOKENIZER_DIR)
