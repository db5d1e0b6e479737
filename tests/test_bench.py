"""research.bench: the table, the FLOP counts, compile counts; and
benchmarks/compare_torch.py, the Hugging Face PyTorch run beside it.

No assertion here is on a timing: only that rates exist and are consistent.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import quickstart
from research import bench
from research.training import flops as flops_lib
from research.training import host_memory
from research.models import BertConfig, create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import compare_torch  # pylint: disable=wrong-import-position  # benchmarks/
SMALL = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=1024,
                   max_position_embeddings=128)


def _config(model_dir, **overrides):
  config = quickstart.get_config()
  config.model.name = str(model_dir)
  config.wandb.mode = "disabled"
  config.batch_size = 32  # 10 steps per epoch on the 320 quickstart examples
  config.data.buckets = (24, 64)  # two shapes: fewer compilations to wait for
  config.parallelism.mesh_shape = (1, 1, 1)  # test_parallel.py covers meshes
  config.optimizer.learning_rate = 1e-3
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def result(tiny_model_dir, compilation_cache):
  """2.5 epochs on one device.

  Compiled without most XLA optimisations into conftest's persistent cache
  (compilation_cache): quick, what is asserted here does not depend on them,
  and the CLI test below finds the same programs there.
  """
  del compilation_cache
  return bench.benchmark(_config(tiny_model_dir), steps=25, warmup=2)


@pytest.fixture
def optimised():
  """XLA optimisations on, whatever a module fixture set (FLOP counts)."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def test_table_has_sane_values(result):
  col, raw = result["columns"][0], result["raw"][0]
  # glibc's retained memory is process-wide: on if an earlier test in this
  # worker ran the CLI (config.cpu_malloc=auto).
  assert col["device"] == "1 x cpu" + (
      ", malloc retain" if host_memory.in_effect() else "")
  assert col["examples_per_s"] > 0 and col["padded_tokens_per_s"] > 0
  assert col["real_tokens_per_s"] <= col["padded_tokens_per_s"]
  assert col["padding_efficiency"] == pytest.approx(
      sum(raw["real_tokens"]) / sum(raw["padded_tokens"]))
  assert 0.5 < col["padding_efficiency"] <= 1.0
  assert col["step_ms_p10"] <= col["step_ms_median"] <= col["step_ms_p90"]
  # Every example of a training batch is real: 32 per step.
  assert raw["examples"] == [32] * 25
  # The tiny model: 2 layers of 4 * 32^2 + 2 * 32 * 64 kernel weights.
  assert raw["matmul_params_per_token"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
  assert col["flops_per_token"] == pytest.approx(
      6 * 16384 + 12 * 2 * 32 * col["mean_width"])
  assert col["cost_analysis"]["compiled"] > 0
  assert col["peak_memory_bytes"] is None  # CPU reports none
  assert col["peak_tflops"] is None and "mfu" not in col
  assert col["pipeline"]["batches_per_s"] > 0
  assert 0.0 <= col["eval"]["validation"]["accuracy"] <= 1.0
  # Time to first step: from before the build to the end of step 1, so it
  # holds the compile; the eval time follows its background compile.
  assert col["time_to_first_step"] > col["compile_seconds"] > 0
  assert col["eval_seconds"] > 0
  table = result["table"]
  for label in ("training examples/s", "padding efficiency", "MFU",
                "compilations train / eval", "host pipeline", "compile time s",
                "time to first step s", "eval s (compiled before step 1)",
                "cost_analysis; CPU only", "dev validation/accuracy"):
    assert label in table
  assert "| peak device memory | n/a |" in table


def test_packed_rows_count_examples_and_padded_flops(tiny_model_dir,
                                                    compilation_cache):
  """With packing: examples per step unchanged, padded FLOPs at row width."""
  del compilation_cache
  out = bench.benchmark(_config(tiny_model_dir, **{
      "data.examples_per_row": 4, "data.buckets": (96, 128, 256)}),
                        steps=6, warmup=1)
  col, raw = out["columns"][0], out["raw"][0]
  assert raw["examples"] == [32] * 6
  assert set(raw["width"]) <= {96, 128, 256}
  assert raw["padded_tokens"] == [8 * w for w in raw["width"]]  # 8 rows
  # Real tokens are the examples' (mean 15.7 over the quickstart set), not
  # the rows' padded widths.
  assert 12 < np.sum(raw["real_tokens"]) / np.sum(raw["examples"]) < 20
  assert col["padding_efficiency"] == pytest.approx(
      sum(raw["real_tokens"]) / sum(raw["padded_tokens"]))
  # 8 rows of w tokens each attend over all w; the head runs per example.
  per_token = raw["matmul_params_per_token"]
  per_seq = raw["matmul_params_per_sequence"]
  for w, flops in zip(raw["width"], raw["padded_flops"]):
    assert flops == pytest.approx(8 * w * (6 * per_token + 12 * 2 * 32 * w)
                                  + 6 * per_seq * 32)


def test_no_compilation_in_the_steps(result):
  col, raw = result["columns"][0], result["raw"][0]
  assert raw["steps_per_epoch"] == 10
  # config.precompile (on by default, as in research.train): every width of
  # the run is compiled before step 1; the steps compile nothing.
  widths = set(raw["width"])
  assert raw["precompiled"] == len(widths) >= 1
  assert col["train_compilations_after_epoch_1"] == 0
  assert not any(raw["compiled"])
  # Each width's first step (its executable's first run) is untimed.
  assert sum(raw["new_shape"]) == col["train_compilations"] == len(widths)
  first = {w: raw["width"].index(w) for w in widths}
  assert sorted(np.flatnonzero(raw["new_shape"])) == sorted(first.values())
  assert col["train_compilations"] <= len(col["buckets"])
  assert col["eval_compilations"] <= len(col["buckets"])
  timed = np.asarray(raw["timed"])
  assert not timed[np.asarray(raw["new_shape"])].any() and not timed[:2].any()
  assert col["timed_steps"] == timed.sum()


@pytest.mark.slow
@pytest.mark.parametrize("precompile", [True, False])
def test_precompile_moves_every_compilation_before_step_1(
    tiny_model_dir, compilation_cache, precompile):
  """Widths met late compile up front: packed rows of 4, automatic buckets.

  The persistent cache is off and the buckets are this test's own, so every
  program really compiles (in-process caches would hide it).
  """
  del compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    # Seeds differ per case: each meets its widths for the first time.
    config = _config(tiny_model_dir, **{
        "data.examples_per_row": 4, "data.buckets": (), "precompile": precompile,
        "seed": 11 if precompile else 13, "data.max_length": 40 if precompile else 44})
    raw = bench.run_jax(bench.setup(config), steps=30, warmup=2,
                        evaluate=False, cost_analysis=False)
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
  widths = set(raw["width"])
  assert len(widths) > 1
  assert raw["new_shape"] == [raw["width"].index(w) == i
                              for i, w in enumerate(raw["width"])]
  if precompile:
    assert raw["precompiled"] == len(widths)
    assert raw["compile_events"] >= len(widths)
    assert not any(raw["compiled"])
  else:
    assert raw["precompiled"] == 0
    assert raw["compiled"] == raw["new_shape"]
  # Both plans meet some width only after epoch 1 (10 steps).
  late = [w for w in widths if raw["width"].index(w) >= raw["steps_per_epoch"]]
  assert late
  assert raw["train_compilations_after_epoch_1"] == (0 if precompile else len(late))


def test_flops_formula_against_a_hand_count():
  """bert-base at 128 tokens: 6 x 12 layers x 12 x 768^2 + 12 x 12 x 768 x 128."""
  model = nnx.eval_shape(lambda: create_model("sequence_classification",
                                              BertConfig(), 2))
  per_token, per_sequence = flops_lib.matmul_params(model)
  assert per_token == 12 * (4 * 768 * 768 + 2 * 768 * 3072) == 84_934_656
  assert per_sequence == 768 * 768 + 768 * 2  # pooler, classifier
  flops = flops_lib.flops_per_token(12, 768, 128, per_token)
  assert flops == 509_607_936 + 14_155_776 == 523_763_712  # ~0.524 GFLOP
  # Real lengths count each sequence's own attention span.
  assert flops_lib.batch_model_flops([128, 64], per_token, 0, 12, 768) == (
      128 * flops + 64 * flops_lib.flops_per_token(12, 768, 64, per_token))


def test_compiled_flops_match_the_analytic_count(optimised):
  del optimised
  counted = flops_lib.abstract_step_flops(SMALL, batch_size=4, seq_len=128)
  assert counted["ratio"] == pytest.approx(1.0, abs=0.1), counted
  # The check catches recomputation: remat runs each layer's forward twice
  # (counted on the lowered program: no second compilation).
  remat = flops_lib.abstract_step_flops(SMALL, batch_size=4, seq_len=128,
                                    remat=True, compile=False)
  assert remat["ratio"] > 1.2, remat


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
    ("TPU v3", 123.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
    ("cpu", None), ("Tesla T4", None)])
def test_peak_detected_from_device_kind(kind, peak):
  assert flops_lib.detect_peak_tflops(kind) == peak


def test_mfu_uses_the_given_peak(result):
  col = bench.summarize(result["raw"][0], peak_tflops=2.0)
  assert col["peak_tflops"] == 2.0  # per device, one device
  assert col["mfu"] == pytest.approx(col["model_tflops_per_s"] / 2.0)
  assert col["mfu_padded"] >= col["mfu"]


def test_torch_runs_the_same_work_side_by_side(tiny_model_dir, result):
  pytest.importorskip("torch")
  s = bench.setup(_config(tiny_model_dir))
  raw = compare_torch.run_torch(s, steps=3, order="bucketed")
  assert raw["examples"] == [32] * 3
  # Dynamic padding: each batch is as wide as its longest example, which
  # is never wider than our bucket for the same examples.
  ours = [s.train_batches.batch_at(i)["attention_mask"].shape[1] for i in range(3)]
  assert all(t <= o for t, o in zip(raw["width"], ours))
  assert raw["real_tokens"] == [int(s.train_batches.batch_at(i)["attention_mask"].sum())
                                for i in range(3)]
  assert 0.0 <= raw["eval"]["validation"]["accuracy"] <= 1.0
  col = bench.summarize(raw, timed=[False, True, True])
  assert col["timed_steps"] == 2
  table = bench.format_table([result["columns"][0], col])
  assert "HF PyTorch" in table and "speed-up" in table


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trainer_does_the_lean_loops_work(tiny_model_dir, dtype):
  """transformers.Trainer on the plan: the same batches and, with dropout
  off, the same losses and predictions as the lean loop (bf16: both under
  autocast, which changes the loss)."""
  pytest.importorskip("torch")
  config = _config(tiny_model_dir, **{"model.dtype": dtype,
                                      "model.hidden_dropout": 0.0,
                                      "model.attention_dropout": 0.0})
  s = bench.setup(config)
  loop = compare_torch.run_torch(s, steps=3, order="bucketed")
  trainer = compare_torch.run_torch(s, steps=3, order="bucketed", trainer=True)
  assert trainer["runner"] == "trainer" and len(trainer["step_times"]) == 3
  for key in ("examples", "real_tokens", "padded_tokens", "width"):
    assert trainer[key] == loop[key]
  assert trainer["final_loss"] == pytest.approx(loop["final_loss"], abs=1e-5)
  assert trainer["eval"] == loop["eval"]
  col = bench.summarize(trainer, timed=[False, True, True])
  assert ("bf16 autocast" in col["device"]) == (dtype == "bfloat16")
  assert "| HF Trainer |" in bench.format_table([col])


def test_bad_settings_are_named(tiny_model_dir):
  config = _config(tiny_model_dir)
  with pytest.raises(bench.BenchError, match="--warmup=-1"):
    bench.benchmark(config, warmup=-1)
  with pytest.raises(bench.BenchError, match="--torch_order='sorted'.*random"):
    compare_torch.compare(config, order="sorted")
  with pytest.raises(bench.BenchError, match="--peak_tflops"):
    bench.benchmark(config, peak_tflops=-5.0)
  with pytest.raises(bench.BenchError, match="--steps=3 must exceed --warmup=3"):
    bench.benchmark(config, steps=3, warmup=3)


@pytest.mark.slow
def test_cli_prints_the_table(tiny_model_dir, result, compilation_cache):
  """The CLI on the fixture's config, its programs read from the same cache."""
  del result, compilation_cache
  env = dict(os.environ,
             JAX_COMPILATION_CACHE_DIR=jax.config.values["jax_compilation_cache_dir"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  args = ["--config", "experiments/quickstart.py",
          f"--config.model.name={tiny_model_dir}", "--config.batch_size=32",
          "--config.data.buckets=(24,64)",
          "--config.parallelism.mesh_shape=(1,1,1)",
          "--config.optimizer.learning_rate=1e-3",
          "--config.wandb.mode=disabled", "--steps=3", "--warmup=1"]
  out = subprocess.run(
      [sys.executable, "-m", "research.bench"] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| training examples/s |" in out.stdout
  # config.cpu_malloc=auto: no TPU/GPU runtime here, so glibc retains memory.
  assert "| device | 1 x cpu, malloc retain |" in out.stdout
  assert "| dev validation/accuracy |" in out.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "research.bench", "--config",
       "experiments/quickstart.py", "--warmup=-2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert bad.returncode == 2 and "error: --warmup=-2" in bad.stderr
  moved = subprocess.run(
      [sys.executable, "-m", "research.bench", "--compare_torch"] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert moved.returncode == 2 and "benchmarks/compare_torch.py" in moved.stderr
  # The PyTorch comparison, outside the library, prints the same table with
  # Hugging Face's column beside ours.
  both = subprocess.run(
      [sys.executable, "benchmarks/compare_torch.py"] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert both.returncode == 0, both.stderr[-2000:]
  assert "| quantity | ours (JAX) | HF PyTorch | speed-up |" in both.stdout


def test_profile_writes_a_trace_of_the_steps_after_warmup(tiny_model_dir,
                                                          compilation_cache,
                                                          tmp_path):
  del compilation_cache
  out = bench.benchmark(_config(tiny_model_dir), steps=5, warmup=2,
                        profile_dir=str(tmp_path / "prof"))
  assert out["raw"][0]["profile_dir"] == str(tmp_path / "prof")
  traces = list((tmp_path / "prof").glob("plugins/profile/*/*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_cost_analysis_is_cpu_only_in_the_table():
  col = {"framework": "jax", "eval": {}, "cost_analysis": {
      "skipped": "CPU only (library calls such as cuBLAS are not counted)"}}
  for key in ("examples_per_s", "step_ms_median", "step_ms_p10", "step_ms_p90"):
    col[key] = 1.0
  col["timed_steps"] = 1
  table = bench.format_table([col])
  assert "| compiled / analytic FLOPs (cost_analysis; CPU only) | n/a (library calls not counted) |" in table


def test_end_to_end_runs_both_sides_on_the_same_job(tiny_model_dir, tmp_path):
  """benchmarks/end_to_end.py: `research.train` and the Hugging Face loop,
  each in its own process, do the same number of updates and are scored by
  the same evaluator (the same metric keys)."""
  pytest.importorskip("torch")
  import end_to_end  # pylint: disable=import-outside-toplevel  # benchmarks/
  results = end_to_end.main([
      "--config=experiments/quickstart.py", f"--config.model.name={tiny_model_dir}",
      "--config.total_steps=3", "--config.data.buckets=(64,)",
      "--config.wandb.mode=disabled", "--config.parallelism.mesh_shape=(1,1,1)",
      "--keep", str(tmp_path)])
  ours, hf = results["ours, cold cache"], results["hf"]
  assert hf["steps"] == 3 and np.isfinite(hf["final_loss"])
  assert ours["shapes"] == 1 and ours["compile_s"] > 0
  assert set(ours["metrics"]) == set(hf["metrics"]) >= {"eval/accuracy"}
  assert 0.0 <= hf["metrics"]["eval/accuracy"] <= 1.0
  assert set(hf["phases_s"]) == {"torch imported", "ours imported", "data",
                                 "model", "train", "eval"}
  assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in (ours, hf))
  table = end_to_end.report(results)
  assert table.count("\n") == 3 and "x |" in table
