"""Runs the few-shot protocol of an experiment, or prints the results table.

    python -m research.fewshot --config experiments/fewshot_prompt.py \
        --workdir /tmp/fs/quickstart/prompt [--k 16] [--seeds 13,21,42,87,100]
    python -m research.fewshot --config experiments/fewshot_prompt.py \
        --workdir /tmp/fs/quickstart/zero_shot --zero_shot
    python -m research.fewshot --table /tmp/fs [--out table.md]

The experiment's training data is the pool the K-shot sets are drawn from,
its evaluation split the test set (`research/fewshot/protocol.py`). `--k 0`
trains once per seed on the whole training set (the full-data reference).
`--config.*` overrides apply to every split. Exit status 2 with a one-line
message for a config or data mistake.
"""

import logging
import os
import sys

from research.fewshot import sampling


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from research import cli  # pylint: disable=import-outside-toplevel
  from research.configs import validate  # pylint: disable=import-outside-toplevel
  from research.fewshot import protocol, table  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "wandb"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  f = flags.FLAGS
  if f.table:
    text = table.markdown(table.collect(f.table), f.metric)
    if f.out:
      with open(f.out, "w", encoding="utf-8") as out:
        out.write(text)
    print(text)
    return
  if f.config is None or not f.workdir:
    print("error: --config and --workdir are required (or --table ROOT)",
          file=sys.stderr)
    sys.exit(2)
  config = f.config
  label = f.label or (os.path.basename(config_flags.get_config_filename(
      f["config"])) + (" zero-shot" if f.zero_shot else ""))
  try:
    seeds = tuple(int(s) for s in f.seeds.split(",") if s.strip())
  except ValueError:
    print(f"error: --seeds={f.seeds!r}: expected integers separated by "
          "commas, e.g. 13,21,42,87,100", file=sys.stderr)
    sys.exit(2)
  try:
    validate(config)
    cli.configure_process(config)
    summary = protocol.run_protocol(
        config, f.workdir, f.k, seeds, zero_shot=f.zero_shot, label=label,
        keep_checkpoints=f.keep_checkpoints)
  except cli.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for key, value in summary.items():
    if isinstance(value, dict) and "mean" in value:
      print(f"{key}: {100 * value['mean']:.1f} ± {100 * value['std']:.1f} "
            f"over {summary['splits']} splits")
  print(f"wall time per split: {summary['wall_s']:.0f} s")


def parse_flags(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from research import cli  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: experiments/<name>.py[:arg]",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The protocol's directory (resumed).")
  flags.DEFINE_integer("k", 16, "Examples per class (0: the whole training "
                       "set, the full-data reference).")
  flags.DEFINE_string("seeds", ",".join(map(str, sampling.SEEDS)),
                      "The split seeds (LM-BFF's by default).")
  flags.DEFINE_bool("zero_shot", False, "No training: test the model as "
                    "loaded (a prompt on the masked-LM head).")
  flags.DEFINE_string("label", "", "The method's row label in the table "
                      "(default: the experiment's file name).")
  flags.DEFINE_bool("keep_checkpoints", False, "Keep each split's "
                    "checkpoints (default: deleted once tested).")
  flags.DEFINE_string("table", "", "Print the table of every summary under "
                      "this directory instead of running.")
  flags.DEFINE_string("out", "", "With --table: also write it here.")
  flags.DEFINE_string("metric", "test/accuracy", "With --table: the metric.")
  return cli.parse_or_exit(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)
