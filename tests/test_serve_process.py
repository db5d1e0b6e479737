"""research.serve as real server processes on 127.0.0.1: a SIGKILL under
load loses no acknowledged feedback and the server restarts; two Ray Serve
replicas answer as the single process does."""

import concurrent.futures
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra (pip install "
                            "'research-bert[serve]') is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--max_batch", "4", "--batch_sizes", "1,4", "--explain_methods",
         ""]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, port, db, log):
  return subprocess.Popen(
      [sys.executable, "-m", "research.serve", "--workdir", workdir,
       "--port", str(port), "--feedback_db", f"sqlite:///{db}", *QUICK],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(url, proc, timeout=600):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}")
    try:
      if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(1)
  raise TimeoutError(f"{url} not ready after {timeout} s")


def test_sigkill_under_load_loses_no_acknowledged_write(serve_runs, tmp_path):
  workdir = serve_runs["sequence_classification"]
  port, db = _free_port(), tmp_path / "feedback.db"
  url = f"http://127.0.0.1:{port}"
  with open(tmp_path / "server.log", "wb") as log:
    proc = _start(workdir, port, db, log)
    try:
      _wait_ready(url, proc)
      with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/predict", json={"inputs": [
            {"text": f"review number {i}"} for i in range(8)]}).json()
      ids = [p["id"] for p in answer["predictions"]]
      acknowledged, lock, stop = [], threading.Lock(), threading.Event()

      def post_feedback(worker):
        with httpx.Client(base_url=url, timeout=10) as client:
          i = 0
          while not stop.is_set():
            body = {"prediction_id": ids[i % len(ids)], "label": "positive",
                    "comment": f"{worker}-{i}"}
            try:
              r = client.post("/feedback", json=body)
            except httpx.HTTPError:
              return  # the server is gone: not acknowledged
            if r.status_code == 201:
              with lock:
                acknowledged.append((r.json()["id"], body["comment"]))
            i += 1

      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(post_feedback, w) for w in range(8)]
        while len(acknowledged) < 200:
          time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-load
        proc.wait()
        stop.set()
        for w in workers:
          w.result()
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == -signal.SIGKILL
  # The database opens cleanly and holds every acknowledged write.
  conn = sqlite3.connect(db)
  assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
  stored = dict(conn.execute("SELECT id, comment FROM feedback").fetchall())
  assert len(acknowledged) >= 200
  assert all(stored.get(i) == comment for i, comment in acknowledged)
  assert conn.execute("SELECT count(*) FROM predictions").fetchone()[0] == 8
  conn.close()
  # A restart serves again, on the same store.
  with open(tmp_path / "server2.log", "wb") as log:
    proc = _start(workdir, port, db, log)
    try:
      _wait_ready(url, proc)
      with httpx.Client(base_url=url, timeout=30) as client:
        again = client.post("/predict", json={"inputs": [
            {"text": "review number 0"}]}).json()["predictions"][0]
        assert again["label"] == answer["predictions"][0]["label"]
        r = client.post("/feedback", json={"prediction_id": ids[0],
                                           "rating": 1})
        assert r.status_code == 201 and r.json()["id"] > len(stored)
    finally:
      proc.terminate()
      proc.wait(timeout=60)


@pytest.mark.slow
def test_two_ray_replicas_answer_as_one_process(serve_runs, tmp_path):
  pytest.importorskip("ray", reason="ray[serve] is not installed")
  from research.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from research.serve import ray_app  # pylint: disable=import-outside-toplevel
  from tests.serve_runs import REVIEWS  # pylint: disable=import-outside-toplevel
  workdir = serve_runs["sequence_classification"]
  batching = engine_lib.Batching(max_batch=4, batch_sizes=(1, 4))
  single = engine_lib.load(workdir, batching_options=batching,
                           explain_methods=())
  single.start(block=True)
  texts = [t for t, _ in REVIEWS]
  expected = single.predict([{"text": t} for t in texts])
  single.close()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  ray_app.run(ray_app.build(workdir, replicas=2, num_cpus=0.5,
                            store_url=f"sqlite:///{tmp_path}/feedback.db",
                            batching_options=batching, explain_methods=()),
              port=port)
  try:
    from ray import serve  # pylint: disable=import-outside-toplevel
    status = serve.status().applications["research-serve"]
    replicas = status.deployments["research-serve"].replica_states
    assert replicas == {"RUNNING": 2}

    def ask(i):
      with httpx.Client(base_url=url, timeout=60) as client:
        text = texts[i % len(texts)]
        r = client.post("/predict", json={"inputs": [{"text": text}]})
        assert r.status_code == 200, r.text
        return i % len(texts), r.json()["predictions"][0], client.get(
            "/model").json()["process"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      answers = list(pool.map(ask, range(48)))
    assert len({process for _, _, process in answers}) == 2  # both served
    for i, answer, _ in answers:
      assert answer["label"] == expected[i]["label"]
      np.testing.assert_allclose(answer["probabilities"]["positive"],
                                 expected[i]["probabilities"]["positive"],
                                 atol=1e-6)
    # Both replicas write to the one store: feedback on any prediction.
    with httpx.Client(base_url=url, timeout=60) as client:
      for _, answer, _ in answers[:8]:
        assert client.post("/feedback", json={
            "prediction_id": answer["id"], "label": "negative"}
                           ).status_code == 201
  finally:
    ray_app.shutdown()
