"""The feedback store: served predictions and the corrections sent back.

SQLAlchemy Core over any database URL. SQLite is the default: a real file
in WAL mode (readers never block the writer; several server processes, Ray
replicas, may share it), `synchronous=FULL` (a commit is on disk before it
is acknowledged) and a busy timeout. PostgreSQL or any other SQLAlchemy URL
works the same way.

    store = FeedbackStore.open("sqlite:////tmp/feedback.db")
    store.add_predictions([PredictionRecord(id, version, task, request, answer)])
    feedback_id = store.add_feedback(prediction_id, label="positive")
    for fb in store.corrections_since(after_id=0):  # continual learning
      fb.id, fb.label, fb.correction, fb.request, fb.prediction, fb.model_version
    store.count(), store.count("predictions")

Every prediction `/predict` answers is a row (its id goes back to the
client), so a correction arrives with the request, the prediction and the
model version that made it. Writes go through one writer thread that
commits whatever is queued in one transaction (group commit): one fsync
serves many concurrent requests, and a write is acknowledged only once its
transaction committed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any

import sqlalchemy as sa

TABLES = ("predictions", "feedback")
_GROUP = 512  # the most writes per transaction


class UnknownPrediction(KeyError):
  """Feedback names a prediction id the store does not have."""


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
  """One served prediction.

  Attributes:
    id: its id (the server's uuid, returned to the client).
    model_version: the model that made it.
    task: the task's name.
    request: the input, as the client sent it (JSON).
    prediction: the answer (JSON).
  """
  id: str
  model_version: str
  task: str
  request: Any
  prediction: Any


@dataclasses.dataclass(frozen=True)
class Feedback:
  """One feedback row with the prediction it is about.

  Attributes:
    id: increasing integer (read on with `after_id`).
    prediction_id, created_at: the prediction and when feedback came (unix s).
    label: the correct label (a class name, a tag...), or None.
    correction: a structured correction (JSON: entities, an answer span...).
    rating: a score the user gave, or None.
    comment: free text, or None.
    model_version, task, request, prediction: of the prediction.
  """
  id: int
  prediction_id: str
  created_at: float
  label: str | None
  correction: Any
  rating: float | None
  comment: str | None
  model_version: str
  task: str
  request: Any
  prediction: Any


def _tables(metadata):
  predictions = sa.Table(
      "predictions", metadata,
      sa.Column("id", sa.String(64), primary_key=True),
      sa.Column("created_at", sa.Float, nullable=False),
      sa.Column("model_version", sa.String(256), nullable=False),
      sa.Column("task", sa.String(256), nullable=False),
      sa.Column("request", sa.JSON, nullable=False),
      sa.Column("prediction", sa.JSON, nullable=False))
  feedback = sa.Table(
      "feedback", metadata,
      sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
      sa.Column("prediction_id", sa.String(64),
                sa.ForeignKey("predictions.id"), nullable=False, index=True),
      sa.Column("created_at", sa.Float, nullable=False),
      sa.Column("label", sa.Text),
      sa.Column("correction", sa.JSON(none_as_null=True)),
      sa.Column("rating", sa.Float),
      sa.Column("comment", sa.Text))
  return predictions, feedback


def _sqlite_pragmas(synchronous):
  def on_connect(dbapi_connection, _):
    cursor = dbapi_connection.cursor()
    # WAL: readers and one writer at once, across processes on one host.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
  return on_connect


class FeedbackStore:
  """Predictions and feedback in a SQLAlchemy database; see the module doc."""

  def __init__(self, engine: sa.engine.Engine):
    self.engine = engine
    self.url = engine.url.render_as_string(hide_password=True)
    metadata = sa.MetaData()
    self.predictions, self.feedback = _tables(metadata)
    metadata.create_all(engine)
    self._queue = queue.Queue()
    self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                    name="feedback-writer")
    self._writer.start()

  @classmethod
  def open(cls, url: str = "sqlite:///feedback.db", *,
           synchronous: str = "FULL") -> "FeedbackStore":
    """Opens (creating the tables if needed) the store at a database URL.

    Args:
      url: a SQLAlchemy URL: "sqlite:///relative.db", "sqlite:////abs.db",
        "postgresql+psycopg://user@host/db", ...; "sqlite://" is in memory.
      synchronous: SQLite's PRAGMA synchronous: FULL (a commit survives a
        power loss) or NORMAL (survives a killed process; faster).

    Raises:
      ValueError: a malformed URL or synchronous mode, naming it.
    """
    if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
      raise ValueError(f"synchronous={synchronous!r}; valid: FULL, NORMAL, "
                       "EXTRA")
    try:
      parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as e:
      raise ValueError(f"feedback store URL {url!r}: {e}") from e
    kwargs = {}
    if parsed.get_backend_name() == "sqlite":
      kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
      if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = sa.pool.StaticPool  # one shared connection
    engine = sa.create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
      sa.event.listen(engine, "connect", _sqlite_pragmas(synchronous.upper()))
    return cls(engine)

  # --- Writes (one writer thread, group commit) -----------------------------

  def _write_loop(self):
    while True:
      first = self._queue.get()
      if first is None:
        return
      ops = [first]
      while len(ops) < _GROUP:
        try:
          op = self._queue.get_nowait()
        except queue.Empty:
          break
        if op is None:
          self._queue.put(None)  # stop after this group
          break
        ops.append(op)
      results = []
      try:
        with self.engine.begin() as conn:
          results = [fn(conn) for fn, _ in ops]
      except Exception as e:  # pylint: disable=broad-except
        for _, future in ops:
          future.set_exception(e)
        continue
      for (_, future), result in zip(ops, results):
        if isinstance(result, Exception):
          future.set_exception(result)
        else:
          future.set_result(result)

  def _submit(self, fn) -> concurrent.futures.Future:
    if not self._writer.is_alive():
      raise RuntimeError(f"feedback store {self.url} is closed")
    future = concurrent.futures.Future()
    self._queue.put((fn, future))
    return future

  def submit_predictions(self, records) -> concurrent.futures.Future:
    """Queues `PredictionRecord`s; the future resolves once committed."""
    rows = [{"id": r.id, "created_at": time.time(),
             "model_version": r.model_version, "task": r.task,
             "request": r.request, "prediction": r.prediction}
            for r in records]

    def insert(conn):
      if rows:
        conn.execute(self.predictions.insert(), rows)
      return len(rows)
    return self._submit(insert)

  def submit_feedback(self, prediction_id: str, *, label=None,
                      correction=None, rating=None,
                      comment=None) -> concurrent.futures.Future:
    """Queues one feedback row; the future gives its id once committed, or
    raises `UnknownPrediction`."""
    row = {"prediction_id": prediction_id, "created_at": time.time(),
           "label": label, "correction": correction, "rating": rating,
           "comment": comment}

    def insert(conn):
      known = conn.execute(sa.select(self.predictions.c.id).where(
          self.predictions.c.id == prediction_id)).first()
      if known is None:
        return UnknownPrediction(prediction_id)
      return conn.execute(self.feedback.insert(), row).inserted_primary_key[0]
    return self._submit(insert)

  def add_predictions(self, records) -> int:
    """Writes `PredictionRecord`s; returns how many, once committed."""
    return self.submit_predictions(records).result()

  def add_feedback(self, prediction_id: str, **kwargs) -> int:
    """Writes one feedback row (see `submit_feedback`); returns its id."""
    return self.submit_feedback(prediction_id, **kwargs).result()

  # --- Reads -----------------------------------------------------------------

  def feedback_since(self, after_id: int = 0, limit: int | None = None, *,
                     corrections_only: bool = False) -> list[Feedback]:
    """Feedback rows with id > after_id, oldest first, with their predictions.

    Args:
      after_id: the last id already read (0: from the start).
      limit: the most rows (None: all).
      corrections_only: only rows with a label or a correction.
    """
    f, p = self.feedback, self.predictions
    query = (sa.select(f, p.c.model_version, p.c.task, p.c.request,
                       p.c.prediction)
             .join(p, f.c.prediction_id == p.c.id)
             .where(f.c.id > after_id).order_by(f.c.id))
    if corrections_only:
      query = query.where(sa.or_(f.c.label.is_not(None),
                                 f.c.correction.is_not(None)))
    if limit is not None:
      query = query.limit(limit)
    with self.engine.connect() as conn:
      return [Feedback(**row._asdict()) for row in conn.execute(query)]

  def corrections_since(self, after_id: int = 0,
                        limit: int | None = None) -> list[Feedback]:
    """Feedback that says what the answer should have been (a label or a
    correction), id > after_id: what continual learning trains on."""
    return self.feedback_since(after_id, limit, corrections_only=True)

  def recent_requests(self, limit: int) -> list:
    """The inputs of the last `limit` predictions, oldest first: what a
    shadow evaluation replays (`research.continual.gate.shadow`)."""
    p = self.predictions
    query = (sa.select(p.c.request).order_by(p.c.created_at.desc(),
                                             p.c.id.desc()).limit(limit))
    with self.engine.connect() as conn:
      return [row.request for row in conn.execute(query)][::-1]

  def prediction(self, prediction_id: str) -> dict | None:
    """One stored prediction as a dict, or None."""
    with self.engine.connect() as conn:
      row = conn.execute(sa.select(self.predictions).where(
          self.predictions.c.id == prediction_id)).first()
    return None if row is None else row._asdict()

  def count(self, table: str = "feedback") -> int:
    """Rows in "feedback" or "predictions"."""
    if table not in TABLES:
      raise ValueError(f"table={table!r}; valid: {', '.join(TABLES)}")
    t = self.feedback if table == "feedback" else self.predictions
    with self.engine.connect() as conn:
      return int(conn.execute(sa.select(sa.func.count()).select_from(t))
                 .scalar_one())

  def close(self) -> None:
    """Finishes the queued writes, stops the writer, closes connections."""
    if self._writer.is_alive():
      self._queue.put(None)
      self._writer.join()
    self.engine.dispose()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
