"""The HTTP API of a served run (FastAPI; the schema at /openapi.json).

    POST /predict   {"inputs": [{...the task's fields...}]} -> one answer per
                    input, each with its prediction id and `truncated`
    POST /explain   {"inputs": [...], "methods": [...], "target": ...} ->
                    per-word attributions (integrated gradients, SHAP, LIME)
    POST /feedback  {"prediction_id": ..., "label" | "correction" | "rating"
                    | "comment"} -> 201, stored with the prediction
    GET  /model     the model version, task, labels, buckets, limits
    GET  /healthz   the process and its batcher are alive
    GET  /readyz    200 once every padded shape is compiled, else 503
    GET  /metrics   Prometheus: requests, latency, batch sizes, errors

A request's input fields are the task's (`Task.serve_fields`): a text and
maybe a text pair (classification, regression, masked LM), a text or words
(tagging), a question and a context (QA). Bad input is a 4xx with a message
that names the field and the limit, never a 5xx: unknown fields, wrong
JSON types, empty texts, invalid UTF-8 (400), too many inputs (422), a
body over `max_body_bytes` (413), feedback for an unknown prediction
(404). A text over `max_chars` is cut and its answer says so.
"""


import asyncio
import contextlib
import math
import os
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

import fastapi
import prometheus_client as prom
import pydantic
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from research.serve import explain as explain_lib
from research.serve import store as store_lib
from research.tasks.common import ServeInputError

# Latency buckets (seconds) from a millisecond to ten seconds.
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                   10)


def _unicode(value: str) -> str:
  """Rejects strings that cannot be UTF-8 (JSON escapes of lone surrogates)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"not valid Unicode: a lone surrogate at character "
                     f"{e.start}") from e
  return value


Text = Annotated[str, pydantic.Strict(), pydantic.AfterValidator(_unicode)]
NonEmpty = Annotated[str, pydantic.Strict(),
                     pydantic.StringConstraints(min_length=1),
                     pydantic.AfterValidator(_unicode)]
Int = Annotated[int, pydantic.Strict()]
Float = Annotated[float, pydantic.Strict(),
                  pydantic.Field(allow_inf_nan=False)]
FORBID = pydantic.ConfigDict(extra="forbid")


def _json_unicode(value):
  """Checks every string in a JSON value (a feedback correction)."""
  if isinstance(value, str):
    _unicode(value)
  elif isinstance(value, list):
    for v in value:
      _json_unicode(v)
  elif isinstance(value, dict):
    for k, v in value.items():
      _unicode(k)
      _json_unicode(v)
  elif isinstance(value, float) and not math.isfinite(value):
    raise ValueError("numbers must be finite")
  return value


def input_model(fields, name="Input"):
  """A pydantic model of one input from the task's `ServeField`s.

  Strings and lists must be non-empty; fields that share `one_of` are
  alternatives (the schema's oneOf, and checked).
  """
  annotations = {str: NonEmpty, int: Int,
                 list[str]: Annotated[list[NonEmpty],
                                      pydantic.Field(min_length=1)]}
  spec, groups = {}, {}
  for key, f in fields.items():
    kind = annotations.get(f.type, f.type)
    extra = {"ge": f.minimum, "le": f.maximum} if f.type is int else {}
    if f.pattern:
      extra["pattern"] = f.pattern
    if f.one_of:
      groups.setdefault(f.one_of, []).append(key)
    if f.required:
      spec[key] = (kind, pydantic.Field(..., description=f.description,
                                        **extra))
    else:
      spec[key] = (Optional[kind], pydantic.Field(
          f.default, description=f.description, **extra))

  def one_of(item):
    for names in groups.values():
      given = [n for n in names if getattr(item, n) is not None]
      if len(given) != 1:
        raise ValueError(f"give exactly one of {' and '.join(names)}")
    return item

  config = FORBID
  if groups:  # the schema says which fields are alternatives
    config = pydantic.ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": [n]} for names in groups.values()
                  for n in names]})
  return pydantic.create_model(
      name, __config__=config, __validators__={
          "one_of": pydantic.model_validator(mode="after")(one_of)}, **spec)


class Metrics:
  """The app's Prometheus metrics, in their own registry."""

  def __init__(self, engine):
    self.registry = prom.CollectorRegistry()
    kw = {"registry": self.registry}
    self.requests = prom.Counter("serve_requests", "HTTP requests",
                                 ["endpoint", "status"], **kw)
    self.latency = prom.Histogram("serve_request_latency_seconds",
                                  "Request latency", ["endpoint"],
                                  buckets=LATENCY_BUCKETS, **kw)
    self.errors = prom.Counter("serve_errors", "Requests answered 4xx/5xx",
                               ["endpoint", "status"], **kw)
    self.batch_rows = prom.Histogram(
        "serve_batch_rows", "Real rows per model call",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128), **kw)
    self.batch_padded = prom.Histogram(
        "serve_batch_padded_size", "Padded batch size per model call",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128), **kw)
    self.batch_seconds = prom.Histogram(
        "serve_batch_seconds", "Model call time", buckets=LATENCY_BUCKETS,
        **kw)
    prom.Gauge("serve_ready", "1 once every shape is compiled",
               **kw).set_function(lambda: float(engine.ready))
    prom.Gauge("serve_compilations", "Model compilations (traces) so far",
               **kw).set_function(lambda: float(engine.traces))
    engine.batch_listeners.append(self.on_batch)

  def on_batch(self, rows, size, length, seconds):
    del length
    self.batch_rows.observe(rows)
    self.batch_padded.observe(size)
    self.batch_seconds.observe(seconds)


class Metered:
  """ASGI middleware: requests, latency and errors per endpoint and status
  (pure ASGI: no per-request task as `@app.middleware` costs)."""

  def __init__(self, app, metrics):
    self.app = app
    self.metrics = metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    began = time.perf_counter()
    status = [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      endpoint = getattr(scope.get("route"), "path", "other")
      code = str(status[0])
      m = self.metrics
      m.requests.labels(endpoint, code).inc()
      m.latency.labels(endpoint).observe(time.perf_counter() - began)
      if status[0] >= 400:
        m.errors.labels(endpoint, code).inc()


class BodyCheck:
  """ASGI middleware: a request body over `max_bytes` is a 413 and one that
  is not UTF-8 a 400, before anything parses it."""

  def __init__(self, app, max_bytes):
    self.app = app
    self.max_bytes = max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] not in ("POST", "PUT",
                                                          "PATCH"):
      return await self.app(scope, receive, send)
    chunks, size, more = [], 0, True
    while more:
      message = await receive()
      if message["type"] != "http.request":
        return await self.app(scope, receive, send)  # a disconnect
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      more = message.get("more_body", False)
      if size > self.max_bytes:
        return await JSONResponse(
            {"detail": f"the request body is over {self.max_bytes} bytes "
                       "(limit max_body_bytes)"}, 413)(scope, receive, send)
    body = b"".join(chunks)
    try:
      body.decode("utf-8")
    except UnicodeDecodeError as e:
      return await JSONResponse(
          {"detail": f"the request body is not valid UTF-8: byte "
                     f"0x{body[e.start]:02x} at offset {e.start}"},
          400)(scope, receive, send)
    sent = False

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()

    return await self.app(scope, replay, send)


def _printable(value, limit=200):
  """A str (at most `limit` characters) or int safe in a JSON answer: no
  lone surrogates."""
  if isinstance(value, str):
    return value.encode("utf-8", "replace").decode("utf-8")[:limit]
  return value


def _finite(value):
  """JSON-safe: non-finite floats become None (JSON has no inf or NaN)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def create_app(engine, store=None, *, title="research.serve"):
  """The FastAPI app of an `engine.Engine`.

  Args:
    engine: the served model (started by the app's lifespan if not yet).
    store: a `store.FeedbackStore`, or None for "sqlite:///feedback.db".
    title: the OpenAPI title.
  """
  limits = engine.limits
  store = store or store_lib.FeedbackStore.open()
  metrics = Metrics(engine)
  item = input_model(engine.fields, "Input")
  task_fields = ", ".join(engine.fields)

  class PredictRequest(pydantic.BaseModel):
    model_config = FORBID
    inputs: list[item] = pydantic.Field(
        ..., min_length=1, max_length=limits.max_inputs,
        description=f"Up to {limits.max_inputs} inputs ({task_fields}).")

  class ExplainRequest(pydantic.BaseModel):
    model_config = FORBID
    inputs: list[item] = pydantic.Field(
        ..., min_length=1, max_length=limits.max_explain_inputs)
    methods: Optional[list[Literal[explain_lib.METHODS]]] = pydantic.Field(
        None, description="Default: every method the server has.")
    target: Optional[Union[Int, Text]] = pydantic.Field(
        None, description="The class explained (name or id); default the "
        "predicted one.")
    samples: Int = pydantic.Field(
        limits.explain_samples, ge=10, le=limits.max_explain_samples,
        description="SHAP evaluations and LIME samples per input.")
    seed: Int = pydantic.Field(0, ge=0, le=2**31 - 1)

  class FeedbackRequest(pydantic.BaseModel):
    model_config = FORBID
    prediction_id: Text = pydantic.Field(..., max_length=64)
    label: Optional[Text] = pydantic.Field(
        None, max_length=1000, description="The right label; one of the "
        f"model's: {', '.join(engine.label_names) or 'none'}.")
    correction: Optional[Any] = pydantic.Field(
        None, description="A structured correction (JSON): the right "
        "entities, answer span, fills...")
    rating: Optional[Float] = pydantic.Field(None, ge=-1e6, le=1e6)
    comment: Optional[Text] = pydantic.Field(None, max_length=10_000)

    @pydantic.field_validator("correction")
    @classmethod
    def _check(cls, value):
      return _json_unicode(value)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    engine.start()
    yield

  app = fastapi.FastAPI(title=title, lifespan=lifespan, description=(
      f"{engine.task_name} model {engine.version}"))
  app.state.engine, app.state.store, app.state.metrics = engine, store, metrics

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(request, e):
    # FastAPI's handler echoes each bad value: a megabyte text back, or a
    # lone surrogate it then cannot encode (a 500). Where and why suffice.
    del request
    return JSONResponse({"detail": [
        {"loc": [_printable(x) for x in err["loc"]],
         "msg": _printable(err["msg"]), "type": err["type"]}
        for err in e.errors()]}, 422)

  @app.exception_handler(ServeInputError)
  async def bad_input(request, e):
    del request
    return JSONResponse({"detail": _printable(str(e), 2000)}, 422)

  def not_ready():
    return JSONResponse({"detail": "warming up: compiling the model for "
                         f"every padded shape ({engine.compiled}/"
                         f"{engine.shapes}); retry when /readyz is 200"}, 503,
                        headers={"Retry-After": "5"})

  @app.post("/predict", responses={422: {}, 503: {}})
  async def predict(request: PredictRequest):
    """Predicts every input; each answer has an id for /feedback."""
    if not engine.ready:
      return not_ready()
    items = [i.model_dump(exclude_none=True) for i in request.inputs]
    results = await engine.predict_async(items)
    records = []
    for raw, result in zip(items, results):
      result["id"] = uuid.uuid4().hex
      records.append(store_lib.PredictionRecord(
          result["id"], engine.version, engine.task_name, raw,
          _finite(result)))
    await asyncio.wrap_future(store.submit_predictions(records))
    return {"model_version": engine.version, "task": engine.task_name,
            "predictions": _finite(results)}

  @app.post("/explain", responses={422: {}, 503: {}})
  async def explain(request: ExplainRequest):
    """Per-word attributions of each input's first text."""
    if engine.explainer is None:
      raise ServeInputError(
          f"task {engine.task_name!r} has no sequence-level output to "
          "explain (/explain attributes one output per input: sequence "
          "classification and regression)")
    if not engine.ready:
      return not_ready()
    items = [i.model_dump(exclude_none=True) for i in request.inputs]
    # Texts checked and cut as /predict's are.
    items, _ = await run_in_threadpool(engine.clip, items)

    def run():
      return [engine.explainer.explain(
          i, request.methods, request.target, request.samples, request.seed)
              for i in items]

    return {"model_version": engine.version, "task": engine.task_name,
            "explanations": _finite(await run_in_threadpool(run))}

  @app.post("/feedback", status_code=201, responses={404: {}, 422: {}})
  async def feedback(request: FeedbackRequest):
    """Stores a correction or rating of a prediction (by its id)."""
    fields = request.model_dump(exclude={"prediction_id"})
    if all(v is None for v in fields.values()):
      raise ServeInputError("give at least one of label, correction, rating "
                            "and comment")
    if (request.label is not None and engine.label_names and
        request.label not in engine.label_names):
      raise ServeInputError(f"label={request.label!r}; valid: "
                            f"{', '.join(engine.label_names)}")
    try:
      feedback_id = await asyncio.wrap_future(
          store.submit_feedback(request.prediction_id, **fields))
    except store_lib.UnknownPrediction:
      return JSONResponse({"detail": f"no prediction "
                           f"{request.prediction_id!r} in the store"}, 404)
    return {"id": feedback_id, "prediction_id": request.prediction_id}

  @app.get("/model")
  async def model():
    """The served model and the server's limits."""
    return {**engine.info(), "ready": engine.ready,
            "feedback_store": store.url, "process": os.getpid()}

  @app.get("/healthz", responses={503: {}})
  async def healthz():
    """200 while the process and its batcher run."""
    if engine.batcher.alive and engine.error is None:
      return {"status": "ok"}
    return JSONResponse({"status": "failing", "detail": str(
        engine.error or "the batcher is not running")}, 503)

  @app.get("/readyz", responses={503: {}})
  async def readyz():
    """200 once every padded shape is compiled (503 before)."""
    body = {"ready": engine.ready, "compiled": engine.compiled,
            "shapes": engine.shapes, "compilations": engine.traces}
    return body if engine.ready else JSONResponse(body, 503)

  @app.get("/metrics")
  async def prometheus():
    """Prometheus text format."""
    return Response(prom.generate_latest(metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  app.add_middleware(BodyCheck, max_bytes=limits.max_body_bytes)
  app.add_middleware(Metered, metrics=metrics)  # outermost: counts 413s too
  return app
