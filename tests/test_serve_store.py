"""The feedback store (research/serve/store.py): SQLite in WAL mode through
SQLAlchemy, group commits from many threads, the reading API continual
learning uses."""

import concurrent.futures
import sqlite3

import pytest

pytest.importorskip("sqlalchemy", reason="the serve extra (pip install "
                    "'research-bert[serve]') is not installed")

from research.serve import store as store_lib  # pylint: disable=wrong-import-position


def _record(i, version="m@1"):
  return store_lib.PredictionRecord(
      f"p{i}", version, "sequence_classification", {"text": f"text {i}"},
      {"label": "negative", "probabilities": {"negative": 0.9}})


def test_feedback_round_trips_with_its_prediction(tmp_path):
  url = f"sqlite:///{tmp_path}/f.db"
  with store_lib.FeedbackStore.open(url) as store:
    assert store.add_predictions([_record(i) for i in range(3)]) == 3
    first = store.add_feedback("p1", label="positive", comment="wrong")
    store.add_feedback("p2", rating=4.5)
    third = store.add_feedback("p0", correction={"entities": [
        {"type": "PER", "start": 0, "end": 5}]})
    with pytest.raises(store_lib.UnknownPrediction):
      store.add_feedback("p9", label="positive")
    assert (store.count(), store.count("predictions")) == (3, 3)
    with pytest.raises(ValueError, match="valid: predictions, feedback"):
      store.count("users")
    # Ratings and comments alone are not corrections.
    rows = store.corrections_since(0)
    assert [r.id for r in rows] == [first, third]
    assert rows[0].request == {"text": "text 1"} and rows[0].label == "positive"
    assert rows[0].prediction["label"] == "negative"
    assert rows[0].model_version == "m@1" and rows[0].task == \
        "sequence_classification"
    assert rows[1].correction["entities"][0]["type"] == "PER"
    assert [r.id for r in store.corrections_since(first)] == [third]
    assert [r.rating for r in store.feedback_since(0)] == [None, 4.5, None]
    assert len(store.feedback_since(0, limit=1)) == 1
  # A real database file, in WAL mode, that reopens with everything in it.
  conn = sqlite3.connect(f"{tmp_path}/f.db")
  assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
  assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] == 3
  conn.close()
  with store_lib.FeedbackStore.open(url) as store:
    assert store.count() == 3 and store.prediction("p1")["task"] == \
        "sequence_classification"


def test_concurrent_writes_are_all_acknowledged_and_stored(tmp_path):
  with store_lib.FeedbackStore.open(f"sqlite:///{tmp_path}/f.db",
                                    synchronous="NORMAL") as store:
    store.add_predictions([_record(i) for i in range(50)])

    def write(i):
      return store.add_feedback(f"p{i % 50}", label="positive", rating=i)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      ids = list(pool.map(write, range(400)))
    assert sorted(ids) == list(range(1, 401))
    assert store.count() == 400
    assert sorted(r.rating for r in store.feedback_since(0)) == list(range(400))


def test_bad_urls_and_modes_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="feedback store URL 'not a url'"):
    store_lib.FeedbackStore.open("not a url")
  with pytest.raises(ValueError, match="valid: FULL, NORMAL, EXTRA"):
    store_lib.FeedbackStore.open(f"sqlite:///{tmp_path}/f.db",
                                 synchronous="OFF")
  with store_lib.FeedbackStore.open("sqlite://") as memory:  # in memory
    memory.add_predictions([_record(0)])
    assert memory.add_feedback("p0", label="x") == 1
