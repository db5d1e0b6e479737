"""Shared test setup: 8 simulated CPU devices, quiet TensorFlow, fixtures."""

import importlib.metadata
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: multi-device tests use a mesh
# of 8 simulated CPU devices; single-device code still runs on device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With most optimisations off (below), XLA:CPU's classic emitters compile
# faster than its fusion emitters (the default): the tiny model's 16-step
# run in 1.3-1.5 s against 2.3-2.5 s; the suite spent 40% of its time
# compiling, and took 19.9 min instead of 21.8. Same goldens and parity.
# Not for real runs: with the optimisations on, the classic emitters
# compiled the quickstart in 118 s against 41 s (research.bench, 2 cores).
# jaxlib 0.11 removed the classic emitters, and XLA aborts on a flag it does
# not know: the flag is in jaxlib 0.7-0.10 only.
_JAXLIB = tuple(int(v) for v in
                importlib.metadata.version("jaxlib").split(".")[:2])
if (_JAXLIB < (0, 11) and
    "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# Most test steps are tiny, so compiling them costs more than running them:
# skip LLVM's optimisation passes (set in the environment so that the runs
# tests start in subprocesses inherit it). This halved the slowest tests'
# times; even the real-checkpoint tests' 20 steps do not repay the passes.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# One persistent XLA cache for the session, shared by the xdist workers and
# the runs tests start in subprocesses (a killed run and its resume, the
# same tiny model in many files compile once). Made fresh by the controller
# (the first process to read this file; the workers inherit its environment)
# and removed at its end, so nothing compiled by an earlier session or in
# ~/.cache/research_bert is reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="research_bert_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
else:
  _XLA_CACHE = None  # a worker's, or the user's own: not ours to remove
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import pathlib  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

TESTDATA = pathlib.Path(__file__).parent / "testdata"
# The real data sets beside the repository (../shared/data/SOURCES.md): CI and
# this project's machines have them, a fresh clone does not.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts) -> pathlib.Path:
  """A path under ../shared/data; the calling test (or fixture) skips,
  naming the file, where it is absent."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"needs {path}: the real data sets of ../shared/data, "
                "absent on a fresh clone")
  return path


@pytest.fixture(scope="session")
def minilm_dir():
  """The packaged all-MiniLM-L6-v2 checkpoint directory."""
  from research.models import hf  # pylint: disable=import-outside-toplevel
  return hf.resolve("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir():
  """A small random BERT written by tests/testdata/make_golden.py."""
  return TESTDATA / "tiny_bert"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
  """A 2-layer, 32-wide random BERT with MiniLM's vocabulary and tokenizer.

  Fast enough for end-to-end training tests; written by our own exporter.
  """
  from research.models import BertConfig, create_model, hf  # pylint: disable=import-outside-toplevel
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  out = tmp_path_factory.mktemp("tiny_model")
  hf.export(create_model("sequence_classification", cfg, 2, seed=0), out,
            "sequence_classification", tokenizer_dir=minilm_dir)
  return out


@pytest.fixture(scope="session")
def compilation_cache():
  """The session's persistent XLA cache directory (the top of this file),
  for tests that hand it to the runs they start in subprocesses."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory, tiny_model_dir):
  """{task: workdir}: a tiny trained run of every task head (serving and
  export tests; tests/serve_runs.py)."""
  from tests import serve_runs as runs  # pylint: disable=import-outside-toplevel
  return runs.make_runs(str(tmp_path_factory.mktemp("serve_runs")),
                        tiny_model_dir)


def pytest_configure(config):
  # `pytest -m "not slow"` is the quick tier while developing; the README's
  # command (and CI) runs every test, slow ones included.
  config.addinivalue_line(
      "markers", "slow: over ~30 s in the full suite on 2 CPU cores "
      "(end-to-end runs, subprocess kills and resumes, Ray); part of it")


def pytest_collection_modifyitems(config, items):
  """Slow tests first, each group in file order. xdist's worksteal
  scheduler (the README's `--dist worksteal`) deals the list out in equal
  contiguous thirds and lets an idle worker take half of the longest queue's
  tail, so the slow tests start early and spread as the others steal them.
  (The default `load` scheduler gave the first worker all of them in its
  first fixed chunk: it ran 1,153 s while the others ran 926 s.)"""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  del config
  if _XLA_CACHE is not None:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
