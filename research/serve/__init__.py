"""Serving a fine-tuned run: an HTTP API that batches, explains and records
feedback (`python -m research.serve --workdir W`; docs/serving.md).

  engine.py    a served model: the run's task, tokenizer and backend, the
               server's limits; `load(workdir | export dir | ensemble dir,
               backend=)`
  backends.py  the model as a function of padded arrays: JAX (the restored
               run, jitted; or a StableHLO export), onnxruntime, and a logit
               ensemble of several (research.soup)
  batching.py  dynamic batching: concurrent rows padded to the run's length
               buckets and a few batch sizes, all compiled at start-up
  explain.py   per-word attributions: integrated gradients
               (research.interpret), SHAP and LIME
  store.py     the feedback store (SQLAlchemy; SQLite in WAL mode by default)
  app.py       the FastAPI app: /predict, /explain, /feedback, /model,
               /healthz, /readyz, /metrics
  ray_app.py   the same app as a Ray Serve deployment (replicas)
"""
