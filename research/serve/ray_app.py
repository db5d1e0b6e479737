"""The same API as a Ray Serve deployment: several replicas behind one port.

    python -m research.serve --workdir /tmp/quickstart --ray_replicas 2

Each replica loads the run (`engine.load`), compiles every padded shape
before it takes traffic, and serves `app.create_app` unchanged; Ray's proxy
spreads requests over the replicas (`autoscaling_config` instead of a fixed
count, and a Ray cluster address, scale it out). Every replica records to
the same feedback store: an SQLite file in WAL mode works for replicas on
one host; a cluster needs a database server URL (PostgreSQL).

Ray runs locally with no set-up. Its usage statistics are off
(RAY_USAGE_STATS_ENABLED=0) unless the environment says otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build(path, *, replicas=2, num_cpus=None, name="research-serve",
          store_url="sqlite:///feedback.db", synchronous="FULL",
          compilation_cache="", **engine_kwargs):
  """A bound Ray Serve application of the API.

  Args:
    path: a workdir or an export directory (`engine.load`).
    replicas: how many copies of the model serve.
    num_cpus: CPUs Ray reserves per replica (None: Ray's default, 1).
    name: the deployment's name.
    store_url, synchronous: the feedback store (`FeedbackStore.open`).
    compilation_cache: a directory the replicas share for compiled shapes
      (`engine.use_compilation_cache`; "" for none).
    **engine_kwargs: `engine.load`'s (backend, which, limits,
      batching_options).
  """
  from ray import serve  # pylint: disable=import-outside-toplevel
  actor = {} if num_cpus is None else {"num_cpus": num_cpus}

  @serve.deployment(name=name, num_replicas=replicas, ray_actor_options=actor)
  @serve.ingress()
  class Server:
    """One replica: the model, compiled, and its app."""

    def __init__(self):
      from research.serve import engine, store  # pylint: disable=import-outside-toplevel
      engine.use_compilation_cache(compilation_cache)
      self.engine = engine.load(path, **engine_kwargs)
      self.engine.start(block=True)
      self.store = store.FeedbackStore.open(store_url,
                                            synchronous=synchronous)

    def __serve_build_asgi_app__(self):
      from research.serve import app  # pylint: disable=import-outside-toplevel
      return app.create_app(self.engine, self.store)

  return Server.bind()


def run(application, *, host="127.0.0.1", port=8000, name="research-serve",
        blocking=False):
  """Starts Ray (locally unless RAY_ADDRESS says where) and the application
  at http://host:port/; returns once every replica is ready."""
  import ray  # pylint: disable=import-outside-toplevel
  from ray import serve  # pylint: disable=import-outside-toplevel
  if not ray.is_initialized():
    ray.init(include_dashboard=False, log_to_driver=False,
             configure_logging=False)
  serve.start(http_options={"host": host, "port": port})
  serve.run(application, name=name, route_prefix="/", blocking=blocking)


def shutdown():
  """Stops the deployment and Ray."""
  import ray  # pylint: disable=import-outside-toplevel
  from ray import serve  # pylint: disable=import-outside-toplevel
  serve.shutdown()
  ray.shutdown()
