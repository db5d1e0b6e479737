"""Shared test setup: 8 simulated CPU devices, quiet TensorFlow, fixtures."""

import os

# Must happen before jax is imported anywhere: multi-device tests use a mesh
# of 8 simulated CPU devices; single-device code still runs on device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import pathlib  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

TESTDATA = pathlib.Path(__file__).parent / "testdata"


@pytest.fixture(scope="session")
def minilm_dir():
  """The packaged all-MiniLM-L6-v2 checkpoint directory."""
  from research.models import hf  # pylint: disable=import-outside-toplevel
  return hf.resolve("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir():
  """A small random BERT written by tests/testdata/make_golden.py."""
  return TESTDATA / "tiny_bert"
