"""Serves a run over HTTP (docs/serving.md).

    python -m research.serve --workdir /tmp/quickstart
    python -m research.serve --workdir /tmp/quickstart --backend onnx
    python -m research.serve --model_dir /tmp/quickstart_onnx   # research.export --format onnx|stablehlo
    python -m research.serve --workdir /tmp/quickstart --ray_replicas 2
    python -m research.serve --workdir /tmp/ensemble   # research.soup --ensemble_out

Listens on http://127.0.0.1:8000 (--host, --port). Feedback goes to
--feedback_db (default: an SQLite file feedback.db in the served directory).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app as absl_app
from absl import flags

from research.serve import engine as engine_lib
from research.serve import explain

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A research.train workdir, a model "
                    "registry version or an ensemble directory to serve.")
flags.DEFINE_string("model_dir", None, "Or a research.export --format "
                    "onnx|stablehlo directory.")
flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
flags.DEFINE_enum("backend", "jax", list(engine_lib.BACKENDS),
                  "A workdir's backend: jax (jitted) or onnx (exported to "
                  "<workdir>/serve_onnx, run by onnxruntime).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port.")
flags.DEFINE_string("feedback_db", "", "SQLAlchemy URL of the feedback store "
                    "(default: sqlite:///<served dir>/feedback.db).")
flags.DEFINE_enum("sqlite_synchronous", "FULL", ["FULL", "NORMAL", "EXTRA"],
                  "SQLite's PRAGMA synchronous for the feedback store.")
flags.DEFINE_integer("max_batch", 32, "Rows per model call.")
flags.DEFINE_float("max_wait_ms", 2.0, "How long a request waits for others "
                   "to share its model call.")
flags.DEFINE_list("batch_sizes", [], "Padded batch sizes (default: powers "
                  "of 2 up to --max_batch).")
flags.DEFINE_list("buckets", [], "Padded lengths (default: the run's "
                  "data.buckets and data.max_length).")
flags.DEFINE_integer("call_cost", 16, "A model call's fixed cost in padded "
                     "tokens (how batched rows are cut into calls).")
flags.DEFINE_string("compilation_cache", None, "JAX's persistent compilation "
                    "cache (default: <served dir>/xla_cache; '' for none): a "
                    "restart reads its compiled shapes.")
for _field in engine_lib.Limits.__dataclass_fields__.values():
  flags.DEFINE_integer(_field.name, _field.default, f"Limit: {_field.name} "
                       "(research.serve.engine.Limits).")
flags.DEFINE_list("explain_methods", list(explain.METHODS), "The /explain "
                  "methods (empty: no /explain, a quicker start-up).")
flags.DEFINE_integer("ray_replicas", 0, "> 0: serve through Ray Serve with "
                     "this many replicas.")
flags.DEFINE_float("ray_cpus_per_replica", 1.0, "CPUs Ray reserves per "
                   "replica.")


def options():
  """(path, engine_lib.load kwargs, store URL) from the flags."""
  path = FLAGS.workdir or FLAGS.model_dir
  if bool(FLAGS.workdir) == bool(FLAGS.model_dir):
    raise ValueError("give exactly one of --workdir and --model_dir")
  limits = engine_lib.Limits(**{
      name: getattr(FLAGS, name)
      for name in engine_lib.Limits.__dataclass_fields__})
  batching = engine_lib.Batching(
      FLAGS.max_batch, FLAGS.max_wait_ms,
      tuple(int(b) for b in FLAGS.batch_sizes),
      tuple(int(b) for b in FLAGS.buckets), FLAGS.call_cost)
  url = FLAGS.feedback_db or "sqlite:///" + os.path.join(
      os.path.abspath(path), "feedback.db")
  kwargs = {"limits": limits, "batching_options": batching,
            "explain_methods": tuple(FLAGS.explain_methods)}
  if FLAGS.workdir:
    kwargs.update(backend=FLAGS.backend, which=FLAGS.which)
  cache = (os.path.join(os.path.abspath(path), "xla_cache")
           if FLAGS.compilation_cache is None else FLAGS.compilation_cache)
  return path, kwargs, url, cache


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "jax2onnx", "onnx_ir"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    path, kwargs, url, cache = options()
    if FLAGS.ray_replicas > 0:
      from research.serve import ray_app  # pylint: disable=import-outside-toplevel
      ray_app.run(ray_app.build(
          path, replicas=FLAGS.ray_replicas,
          num_cpus=FLAGS.ray_cpus_per_replica, store_url=url,
          synchronous=FLAGS.sqlite_synchronous, compilation_cache=cache,
          **kwargs),
                  host=FLAGS.host, port=FLAGS.port, blocking=True)
      return
    import uvicorn  # pylint: disable=import-outside-toplevel
    from research.serve import app, store  # pylint: disable=import-outside-toplevel
    engine_lib.use_compilation_cache(cache)
    engine = engine_lib.load(path, **kwargs)
    feedback = store.FeedbackStore.open(url,
                                        synchronous=FLAGS.sqlite_synchronous)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("serving %s (%s) on http://%s:%d, feedback in %s",
               engine.version, engine.backend.name, FLAGS.host, FLAGS.port,
               feedback.url)
  uvicorn.run(app.create_app(engine, feedback), host=FLAGS.host,
              port=FLAGS.port, log_level="warning", access_log=False)
  feedback.close()
  engine.close()


if __name__ == "__main__":
  absl_app.run(main)
