r"""Load test: research.serve vs the same app serving transformers' pipeline.

    python -m research.train --config experiments/quickstart.py --workdir /tmp/quickstart
    python benchmarks/serve_load.py --workdir /tmp/quickstart

Starts each server as its own process on 127.0.0.1 (nothing else is ever
contacted) and drives it with an asyncio httpx client: the quickstart dev
sentences, one per /predict request, at concurrency 1, 8 and 32, each level
bounded by a request count and a time limit. While it runs, a tenth of the
answers get a /feedback post; afterwards the feedback table must hold
exactly the accepted count. Servers:

- `research.serve (jax)`: the run restored, jitted, dynamic batching over
  the run's length buckets (`python -m research.serve --workdir W`);
- `research.serve (onnx)`: the same with `--backend onnx` (the run exported
  by jax2onnx, run by onnxruntime);
- `transformers pipeline`: the same FastAPI app (`research.serve.app`,
  same validation, feedback store and metrics) whose engine calls
  `transformers.pipeline("text-classification")` of the run's Hugging Face
  export on each request's texts, in FastAPI's worker threads: the
  do-it-yourself path (`serve-pipeline`, below).

Then research.serve is killed with SIGKILL while feedback is being posted:
the SQLite file must pass `PRAGMA integrity_check` and hold every
acknowledged write, and a restarted server must become ready again.
Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

HOST = "127.0.0.1"  # load and fuzz traffic never leaves this host
LEVELS = ((1, 300), (8, 1200), (32, 2400))  # (concurrency, requests)


# --- The baseline server: research.serve's app around a transformers pipeline --


def pipeline_engine(workdir, hf_dir):
  """An `engine.Engine` whose predictions come from transformers.pipeline."""
  import transformers  # pylint: disable=import-outside-toplevel
  from research import data, restore, tasks  # pylint: disable=import-outside-toplevel
  from research.serve import engine as engine_lib  # pylint: disable=import-outside-toplevel

  class NoModel:  # the batcher is never used: the pipeline batches itself
    name = "transformers-pipeline"
    traces = 0

    def __call__(self, *arrays):
      raise RuntimeError("the pipeline engine does not batch")

  class PipelineEngine(engine_lib.Engine):
    """Each request's texts through `pipe(texts)`, as FastAPI code does."""

    def __init__(self):
      config = restore.read_config(workdir)
      tokenizer = data.load_tokenizer(hf_dir)
      self.pipe = transformers.pipeline("text-classification", model=hf_dir,
                                        tokenizer=tokenizer, device="cpu",
                                        top_k=None)
      super().__init__(
          tasks.load(config, tokenizer), NoModel(),
          label_names=data.load_label_names(f"{workdir}/labels.json"),
          version=f"transformers-pipeline:{hf_dir}",
          max_length=config.data.max_length, explain_methods=(),
          batching_options=engine_lib.Batching(max_batch=1))

    def start(self, block=False):
      del block
      self.batcher.start()
      self.compiled = self.shapes
      self._ready.set()

    async def predict_async(self, items):
      # In FastAPI's worker threads, as a synchronous endpoint would run.
      from starlette.concurrency import run_in_threadpool  # pylint: disable=import-outside-toplevel
      return await run_in_threadpool(self.predict, items)

    def predict(self, items):
      items, notes = self.clip(items)
      outputs = self.pipe([i["text"] for i in items], truncation=True,
                          max_length=self.max_length)
      results = []
      for scores, note in zip(outputs, notes):
        best = max(scores, key=lambda s: s["score"])
        results.append({"truncated": bool(note), "notes": note,
                        "label": best["label"],
                        "label_id": self.label_names.index(best["label"]),
                        "probabilities": {s["label"]: s["score"]
                                          for s in scores}})
      return results

  return PipelineEngine()


def serve_pipeline(args):
  import uvicorn  # pylint: disable=import-outside-toplevel
  from research.serve import app, store  # pylint: disable=import-outside-toplevel
  engine = pipeline_engine(args.workdir, args.hf_dir)
  uvicorn.run(app.create_app(engine, store.FeedbackStore.open(args.db)),
              host=HOST, port=args.port, log_level="warning",
              access_log=False)


# --- The load client -----------------------------------------------------------


def free_port():
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def wait_ready(url, proc, timeout=1200):
  import httpx  # pylint: disable=import-outside-toplevel
  began = time.monotonic()
  while time.monotonic() - began < timeout:
    if proc.poll() is not None:
      raise RuntimeError(f"server exited with {proc.returncode}")
    try:
      if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
        return time.monotonic() - began
    except httpx.HTTPError:
      pass
    time.sleep(1)
  raise TimeoutError(url)


async def drive(url, texts, concurrency, requests, seconds, feedback_every):
  """Runs `requests` /predict calls (or for `seconds`) with `concurrency`
  workers; posts /feedback on every `feedback_every`-th answer."""
  import httpx  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  latencies, accepted, errors = [], 0, 0
  counter = iter(range(requests))
  deadline = time.monotonic() + seconds
  limits = httpx.Limits(max_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=60,
                               limits=limits) as client:

    async def worker():
      nonlocal accepted, errors
      for i in counter:
        if time.monotonic() > deadline:
          return
        began = time.perf_counter()
        r = await client.post("/predict", json={"inputs": [
            {"text": texts[i % len(texts)]}]})
        latencies.append(time.perf_counter() - began)
        if r.status_code != 200:
          errors += 1
          continue
        if feedback_every and i % feedback_every == 0:
          answer = r.json()["predictions"][0]
          f = await client.post("/feedback", json={
              "prediction_id": answer["id"], "label": answer["label"],
              "comment": f"load test {i}"})
          accepted += f.status_code == 201
          errors += f.status_code != 201

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
  lat = np.asarray(latencies) * 1000
  return {"concurrency": concurrency, "requests": len(latencies),
          "seconds": wall, "throughput": len(latencies) / wall,
          "p50_ms": float(np.percentile(lat, 50)),
          "p99_ms": float(np.percentile(lat, 99)),
          "errors": errors, "feedback_accepted": accepted}


def count_feedback(db):
  conn = sqlite3.connect(db)
  try:
    return conn.execute("SELECT count(*) FROM feedback").fetchone()[0]
  finally:
    conn.close()


def measure(name, cmd, db, texts, args):
  port = free_port()
  url = f"http://{HOST}:{port}"
  log = open(os.path.join(args.tmp, f"{name}.log"), "wb")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT)
  try:
    startup = wait_ready(url, proc)
    asyncio.run(drive(url, texts, 4, 64, 60, 0))  # warm up, no feedback
    rows = []
    for concurrency, requests in LEVELS:
      row = asyncio.run(drive(url, texts, concurrency,
                              max(int(requests * args.scale), concurrency),
                              args.seconds, 10))
      row["server"] = name
      rows.append(row)
      print(json.dumps(row), flush=True)
    accepted = sum(r["feedback_accepted"] for r in rows)
    stored = count_feedback(db)
    return rows, {"server": name, "startup_seconds": startup,
                  "feedback_accepted": accepted, "feedback_rows": stored,
                  "equal": accepted == stored}, proc, url
  except BaseException:
    proc.kill()
    raise


def kill_under_load(proc, url, db, cmd, args):
  """SIGKILL research.serve while feedback is posted; check the file."""
  import httpx  # pylint: disable=import-outside-toplevel
  with httpx.Client(base_url=url, timeout=30) as client:
    ids = [p["id"] for p in client.post("/predict", json={"inputs": [
        {"text": "a fine day"}] * 8}).json()["predictions"]]
  acknowledged = []

  async def post(worker):
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
      i = 0
      while True:
        try:
          r = await client.post("/feedback", json={
              "prediction_id": ids[i % 8], "label": "positive",
              "comment": f"kill {worker} {i}"})
        except httpx.HTTPError:
          return
        if r.status_code == 201:
          acknowledged.append((r.json()["id"], f"kill {worker} {i}"))
        i += 1

  async def run():
    tasks = [asyncio.create_task(post(w)) for w in range(16)]
    while len(acknowledged) < 500:
      await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    await asyncio.gather(*tasks)

  asyncio.run(run())
  proc.wait()
  conn = sqlite3.connect(db)
  integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
  stored = dict(conn.execute("SELECT id, comment FROM feedback").fetchall())
  conn.close()
  missing = [i for i, c in acknowledged if stored.get(i) != c]
  port = int(url.rsplit(":", 1)[1])
  log = open(os.path.join(args.tmp, "restart.log"), "wb")  # pylint: disable=consider-using-with
  again = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, stdout=log,
                           stderr=subprocess.STDOUT)
  try:
    restart = wait_ready(url, again)
    with httpx.Client(base_url=url, timeout=30) as client:
      served = client.post("/predict", json={"inputs": [
          {"text": "a fine day"}]}).status_code == 200
  finally:
    again.terminate()
    again.wait(timeout=60)
  return {"acknowledged": len(acknowledged), "integrity_check": integrity,
          "missing_acknowledged": len(missing), "rows": len(stored),
          "restart_ready_seconds": restart, "restart_serves": served}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command")
  p = sub.add_parser("serve-pipeline", help="(internal) the baseline server")
  for a in ("--workdir", "--hf_dir", "--db"):
    p.add_argument(a, required=True)
  p.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", help="a quickstart run")
  parser.add_argument("--hf_dir", default="", help="its Hugging Face export "
                      "(default: research.export into a temporary directory)")
  parser.add_argument("--seconds", type=float, default=120,
                      help="time limit per concurrency level")
  parser.add_argument("--backends", default="jax,onnx",
                      help="research.serve backends to measure (the SIGKILL "
                      "check runs on jax)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies the requests per level (a smoke run: "
                      "0.05)")
  parser.add_argument("--out", default=os.path.join(
      ROOT, "docs", "results", "serve_load.json"))
  args = parser.parse_args()
  if args.command == "serve-pipeline":
    return serve_pipeline(args)
  from research import export  # pylint: disable=import-outside-toplevel
  args.tmp = tempfile.mkdtemp(prefix="serve_load_")
  hf_dir = args.hf_dir or export.export_run(args.workdir,
                                            os.path.join(args.tmp, "hf"))
  with open(os.path.join(ROOT, "data", "quickstart", "dev.tsv"),
            encoding="utf-8") as f:
    texts = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
  theirs_db = os.path.join(args.tmp, "pipeline.db")
  theirs = [sys.executable, os.path.abspath(__file__), "serve-pipeline",
            "--workdir", args.workdir, "--hf_dir", hf_dir, "--db",
            f"sqlite:///{theirs_db}"]
  results = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": HOST,
             "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
             "rows": [], "feedback": []}
  rows, fb, proc, _ = measure("transformers pipeline", theirs, theirs_db,
                              texts, args)
  proc.terminate()
  proc.wait(timeout=60)
  results["rows"] += rows
  results["feedback"].append(fb)
  for backend in args.backends.split(","):
    db = os.path.join(args.tmp, f"{backend}.db")
    ours = [sys.executable, "-m", "research.serve", "--workdir",
            args.workdir, "--backend", backend, "--feedback_db",
            f"sqlite:///{db}", "--explain_methods", "", "--compilation_cache",
            os.path.join(args.tmp, "xla_cache")]
    rows, fb, proc, url = measure(f"research.serve ({backend})", ours, db,
                                  texts, args)
    results["rows"] += rows
    results["feedback"].append(fb)
    if backend == "jax":
      results["sigkill"] = kill_under_load(proc, url, db, ours, args)
    else:
      proc.terminate()
      proc.wait(timeout=60)
  results["load_average_after"] = os.getloadavg()
  print(f"\n{'server':<24}{'conc':>5}{'req':>7}{'req/s':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'errors':>8}")
  for r in results["rows"]:
    print(f"{r['server']:<24}{r['concurrency']:>5}{r['requests']:>7}"
          f"{r['throughput']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
          f"{r['errors']:>8}")
  for fb in results["feedback"]:
    print(f"{fb['server']}: feedback accepted {fb['feedback_accepted']}, rows "
          f"{fb['feedback_rows']}, equal: {fb['equal']}; ready after "
          f"{fb['startup_seconds']:.0f} s")
  if "sigkill" in results:
    print(f"SIGKILL: {json.dumps(results['sigkill'])}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
