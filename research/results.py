"""Prints the GLUE table of a sweep (or of several) beside published numbers.

    python -m research.results --workdir /tmp/glue/sst2
    python -m research.results --workdir /tmp/glue --csv /tmp/glue.csv
    python -m research.results --workdir /tmp/glue/rte --at=final

Reads every run under --workdir (a directory with config.json and
summary.json; runs of one task in one directory are one sweep) and prints, in
Markdown, per task and metric: the best run by the dev metric that selected
checkpoints, and the mean ± std over seeds at the best hyper-parameters,
beside Hugging Face's bert-base-cased dev numbers and the BERT paper's test
numbers (research/evaluation/references/). The loading and formatting are in
research/evaluation/glue.py.
"""

import sys

from research.evaluation import glue


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "A sweep directory (or a parent of "
                      "several).")
  flags.DEFINE_string("csv", None, "Also write the rows (all columns) here.")
  flags.DEFINE_enum("at", "best", ["best", "final"], "Each run's metrics at "
                    "its best checkpoint or at its last evaluation.")
  flags.mark_flags_as_required(["workdir"])

  def run(argv):
    del argv
    try:
      runs, unfinished = glue.collect(flags.FLAGS.workdir, flags.FLAGS.at)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    rows = glue.summarize(runs)
    print(glue.markdown(rows, flags.FLAGS.workdir, flags.FLAGS.at, unfinished))
    if flags.FLAGS.csv:
      glue.write_csv(rows, flags.FLAGS.csv)
      print(f"wrote {flags.FLAGS.csv}")

  app.run(run)


if __name__ == "__main__":
  main()
