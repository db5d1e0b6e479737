"""The command line of `python -m research.train`: flags, exit statuses.

    python -m research.train --config experiments/quickstart.py --workdir /tmp/qs

`--config` is an experiment module (`experiments/<name>.py[:arg]`) with
`--config.<field>=<value>` overrides (ml_collections); `--workdir` is the run
directory (resumed if it holds checkpoints). `run` maps the outcomes to exit
statuses; `parse_or_exit` is shared by every command that takes --config
(`research.bench`, `research.sweep`, benchmarks).
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import jax
import ml_collections

from research import data, parallelism, train
from research.configs import ConfigError
from research.models import hf
from research.training import host_memory
from research.training import xla_flags
from research.training.checkpointing import CheckpointError


# Errors that end a run with a message and exit status 2, no traceback: user
# mistakes (config, data, model name), a full or read-only disk, and stops
# with a reason. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, data.DataError, hf.CheckpointError, CheckpointError,
               parallelism.ParallelismError, train.TrainingError)
# OSErrors that say the disk, not the code, is at fault.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
               errno.EPERM, errno.EFBIG)


def configure_process(config: ml_collections.ConfigDict) -> None:
  """What a config sets for the whole process, before JAX starts its
  backend (see host_memory): the allocator, XLA flags, the persistent
  compilation cache, multi-host start-up."""
  host_memory.configure(config.cpu_malloc)
  xla_flags.configure(config.xla_flags)
  if config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(config.compilation_cache_dir))
  parallelism.initialize_distributed(config.parallelism.distributed)


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains as the command line does; returns the process exit status.

  Returns:
    0 when the run finished (the eval metrics are printed);
    PREEMPTED_EXIT_CODE (143) after SIGTERM: the current step is saved and
    rerunning the same command resumes from it;
    2 for a config or data mistake, a checkpoint that cannot be written or
    read (full or read-only disk), or too many non-finite losses in a row:
    one line "error: ..." on stderr, no traceback.
  """
  try:
    configure_process(config)
    summary = train.train_and_evaluate(config, workdir)
  except train.Preempted as e:
    print(e, file=sys.stderr)
    return train.PREEMPTED_EXIT_CODE
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno not in DISK_ERRNOS:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(train._fmt({k: v for k, v in summary.items()
              if k.startswith("eval") and isinstance(v, float)}))
  return 0


def main(argv):
  """`python -m research.train`: trains the flags' config in --workdir."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "wandb"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sys.exit(run(flags.FLAGS.config, flags.FLAGS.workdir))


def parse_flags(argv):
  """Parses --config/--config.*/--workdir; a bad override is a message."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: experiments/<name>.py[:arg]",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
  flags.mark_flags_as_required(["config", "workdir"])
  return parse_or_exit(argv)


def parse_or_exit(argv):
  """Parses the defined flags; a bad flag or config override is a message.

  ml_collections raises AttributeError/KeyError/TypeError/ValueError for
  unknown or mistyped fields, with the nearest valid name ("Did you mean
  ..."); a get_config error arrives as a formatted traceback, whose last line
  is the message. Shared by every CLI that takes --config.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [l.strip(" '\"") for l in text.splitlines() if l.strip(" '\"")]
    message = lines[-1] if "Traceback" in text else " ".join(lines)
    if isinstance(e, AttributeError):
      message = f"unknown config field {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main_train():
  """Entry point of `python -m research.train`."""
  from absl import app  # pylint: disable=import-outside-toplevel
  app.run(main, flags_parser=parse_flags)
