"""`python -m research.continual --config <experiment> --workdir <stream>`:
runs the continual-learning rounds of `config.continual` (rounds.py); a
rerun goes on from the last finished round. Prints one line per round."""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from research import cli
from research.continual import rounds
from research.continual.registry import RegistryError


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "wandb"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    cli.configure_process(flags.FLAGS.config)
    state = rounds.Stream(flags.FLAGS.config, flags.FLAGS.workdir).run()
  except (*cli.USER_ERRORS, FileNotFoundError, RegistryError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for rec in state["rounds"]:
    scores = ", ".join(f"{k}={v:.4f}" for k, v in rec["scores"].items()
                       if k.endswith(flags.FLAGS.config.eval_metric))
    print(f"round {rec['round']}: {rec['candidate']} "
          f"{'promoted' if rec['promoted'] else 'refused'} ({scores})")
  print(f"current version: {state['current']}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
