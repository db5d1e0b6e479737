"""ONNX (jax2onnx + onnxruntime) and StableHLO (jax.export) exports of every
task head: the same outputs as the JAX model at any batch size and length,
and served from the export directory alone."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the serve extra (pip install "
                    "'research-bert[serve]') is not installed")
pytest.importorskip("jax2onnx", reason="the serve extra (pip install "
                    "'research-bert[serve]') is not installed")

from research import data, export_formats, restore  # pylint: disable=wrong-import-position
from research.models import hf  # pylint: disable=wrong-import-position
from research.serve import backends  # pylint: disable=wrong-import-position
from research.serve import engine as engine_lib  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((1, 5), (3, 17), (8, 32))  # (batch, length): none of them traced


def _restore(workdir):
  config = restore.read_config(workdir)
  tokenizer = data.load_tokenizer(str(hf.resolve(config.model.name)))
  return restore.restore_run(workdir, "best", tokenizer)


@pytest.mark.parametrize("task", ["sequence_classification",
                                  "token_classification",
                                  "question_answering", "masked_lm"])
@pytest.mark.slow
def test_onnx_and_stablehlo_equal_the_jax_model(serve_runs, tmp_path, task):
  restored = _restore(serve_runs[task])
  jax_model = backends.JaxBackend(restored.task, restored.graphdef,
                                  restored.params, restored.frozen)
  meta = export_formats.export_restored(restored, serve_runs[task],
                                        tmp_path / "onnx", "onnx")
  assert meta["max_abs_diff_vs_jax"] <= 1e-4
  onnx_model = backends.OnnxBackend(tmp_path / "onnx" / "model.onnx")
  # Dynamic axes: the graph's batch and length are symbols.
  assert [i.shape for i in onnx_model.session.get_inputs()] == [
      ["batch", "length"]] * 3
  export_formats.export_restored(restored, serve_runs[task],
                                 tmp_path / "hlo", "stablehlo")
  exported = backends.ExportedBackend(
      *export_formats.read_stablehlo(tmp_path / "hlo"))
  for batch, length in SHAPES:
    arrays = export_formats.sample_inputs(30522, batch, length, seed=length)
    ours = jax_model(*arrays)
    for other in (onnx_model(*arrays), exported(*arrays)):
      assert len(other) == len(ours)
      for a, b in zip(ours, other):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  assert len(ours) == (2 if task == "question_answering" else 1)


def test_an_export_directory_serves_the_same_answers(serve_runs, tmp_path):
  workdir = serve_runs["question_answering"]
  batching = engine_lib.Batching(max_batch=4, batch_sizes=(4,))
  items = [{"question": "what color is the car?",
            "context": "we saw a nice day the car is red and then " * 6},
           {"question": "what color is the boat?",
            "context": "the boat is green"}]
  engines = [engine_lib.load(workdir, batching_options=batching),
             engine_lib.load(workdir, backend="onnx",
                             onnx_dir=str(tmp_path / "on_the_fly"),
                             batching_options=batching)]
  for fmt in ("onnx", "stablehlo"):
    export_formats.export_run(workdir, str(tmp_path / fmt), fmt)
    engines.append(engine_lib.load(str(tmp_path / fmt),
                                   batching_options=batching))
  answers = []
  for engine in engines:
    engine.start(block=True)
    answers.append(engine.predict(items))
    engine.close()
  assert [e.backend.name for e in engines] == ["jax", "onnx", "onnx",
                                               "stablehlo"]
  assert len({e.version for e in engines}) == 1  # the same checkpoint
  for other in answers[1:]:
    for a, b in zip(answers[0], other):
      assert (a["answer"], a["start"], a["end"]) == \
          (b["answer"], b["start"], b["end"])
      assert a["score"] == pytest.approx(b["score"], abs=1e-5)
  assert engines[-1].explainer is None and engines[0].explainer is None


@pytest.mark.slow
def test_export_cli_formats(serve_runs, tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "research.export", "--workdir",
       serve_runs["sequence_classification"], "--out", str(out), "--format",
       "onnx"], cwd=REPO, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "onnxruntime vs JAX: max |diff|" in result.stdout
  assert sorted(os.listdir(out)) == ["model.onnx", "serve.json",
                                     "tokenizer.json", "tokenizer_config.json"]
  result = subprocess.run(
      [sys.executable, "-m", "research.export", "--workdir",
       serve_runs["sequence_classification"], "--out", str(out), "--format",
       "onnx", "--peft"], cwd=REPO, capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 2 and "drop it with --format" in result.stderr
