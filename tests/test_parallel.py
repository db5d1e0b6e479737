"""Strategies and meshes on 8 simulated CPU devices (see conftest.py)."""

import os
import pathlib
import stat
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import quickstart
from research import data, parallelism, tasks, train
from research.configs import default
from research.models import BertConfig, create_model, hf
from research.training import optimizers, partition
from research.training.checkpointing import Checkpointer, abstract_like

REPO = pathlib.Path(__file__).parent.parent
GOLDEN = REPO / "tests" / "testdata" / "bert_base_shardings_fsdp2_tensor4.txt"


def _parallelism(strategy, mesh_shape):
  p = default.get_config().parallelism
  p.strategy, p.mesh_shape = strategy, mesh_shape
  return p


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
  """Ten global batches of 16 from the quickstart data, one bucket."""
  config = quickstart.get_config()
  config.data.buckets = (64,)
  train_split, _, _, _ = data.load_splits(config, str(tiny_model_dir))
  batcher = data.Batcher(train_split, 16, (64,), seed=0)
  return [batcher.batch_at(i) for i in range(10)]


def _trajectory(model_dir, batches, strategy, mesh_shape, accum=1, steps=10):
  """Losses and final params of `steps` updates (dropout off: comparable)."""
  model, _ = hf.load_pretrained(
      str(model_dir), "sequence_classification", 2, seed=0,
      config_overrides={"hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0})
  graphdef, params, *frozen = partition.split_model(model)
  opt = default.get_config().optimizer
  opt.learning_rate, opt.grad_accum_steps, opt.warmup_steps = 1e-3, accum, 2
  tx = optimizers.build_optimizer(opt, steps)
  mesh = parallelism.make_mesh(_parallelism(strategy, mesh_shape))
  state = {"params": params, "opt_state": tx.init(params)}
  rules = default.get_config().parallelism.logical_axis_rules
  sharding, frozen_sharding = (
      parallelism.state_shardings(x, mesh, rules, strategy)
      for x in (state, tuple(frozen)))
  state = jax.device_put(state, sharding)
  frozen = jax.device_put(tuple(frozen), frozen_sharding)
  task = tasks.load(quickstart.get_config())  # sequence classification
  step = train.make_train_step(tx, task.loss_fn(graphdef), seed=0, mesh=mesh,
                               strategy=strategy, state_sharding=sharding,
                               frozen_sharding=frozen_sharding)
  losses = []
  for i, batch in enumerate(batches[:steps * accum]):
    state, metrics = step(state, frozen, parallelism.shard_batch(
        batch, parallelism.batch_sharding(mesh)), i)
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state["params"]), state


@pytest.mark.slow
def test_all_strategies_follow_the_single_device_trajectory(tiny_model_dir, batches):
  ref_losses, ref_params, _ = _trajectory(tiny_model_dir, batches, "jit", (1, 1, 1))
  assert ref_losses[-1] < ref_losses[0]  # it trains
  for strategy, mesh_shape in [("pmap", (8, 1, 1)), ("jit", (8, 1, 1)),
                               ("jit", (2, 4, 1)), ("jit", (1, 2, 4))]:
    losses, params, state = _trajectory(tiny_model_dir, batches, strategy,
                                        mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5,
                               err_msg=f"{strategy} {mesh_shape}")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"{strategy} {mesh_shape}")
    if mesh_shape == (1, 2, 4):  # really sharded, not replicated
      kernel = state["params"]["bert"]["layers"][0]["intermediate"]["kernel"]
      assert kernel.sharding.spec == jax.P("fsdp", "tensor")
      assert kernel.addressable_shards[0].data.shape == (16, 16)


def _unpacked(packed, width):
  """The packed batch's examples one per row, in label (slot) order."""
  rows, per_row = packed["example_starts"].shape
  out = {k: np.zeros((rows * per_row, width), np.int32)
         for k in ("input_ids", "attention_mask", "token_type_ids")}
  for r in range(rows):
    for k in range(per_row):
      where = packed["segment_ids"][r] == k + 1
      n = int(where.sum())
      for key in out:
        out[key][r * per_row + k, :n] = packed[key][r][where]
  return dict(out, labels=packed["labels"], weights=packed["weights"])


@pytest.mark.parametrize("strategy,mesh_shape", [("jit", (1, 1, 1)),
                                                 ("pmap", (8, 1, 1)),
                                                 ("jit", (2, 4, 1))])
def test_packed_rows_follow_the_unpacked_trajectory(tiny_model_dir, strategy,
                                                    mesh_shape):
  """Sequence packing changes the layout, not the maths (dropout off)."""
  config = quickstart.get_config()
  train_split, _, _, _ = data.load_splits(config, str(tiny_model_dir))
  packer = data.Batcher(train_split, 16, (64,), seed=0, examples_per_row=2)
  packed = [packer.batch_at(i) for i in range(4)]
  assert packed[0]["input_ids"].shape[0] == 8  # 8 rows of 2 examples
  unpacked = [_unpacked(b, 64) for b in packed]
  ref_losses, ref_params, _ = _trajectory(tiny_model_dir, unpacked, "jit",
                                          (1, 1, 1), steps=4)
  losses, params, _ = _trajectory(tiny_model_dir, packed, strategy, mesh_shape,
                                  steps=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_gradient_accumulation_equals_larger_batch(tiny_model_dir, batches):
  halves = []
  for batch in batches[:2]:
    halves += [{k: v[:8] for k, v in batch.items()},
               {k: v[8:] for k, v in batch.items()}]
  big_losses, big, _ = _trajectory(tiny_model_dir, batches, "jit", (1, 1, 1),
                                   steps=2)
  _, accumulated, _ = _trajectory(tiny_model_dir, halves, "jit", (1, 1, 1),
                                  accum=2, steps=2)
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(big)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _bert_base_shardings():
  cfg = BertConfig()  # bert-base: 12 layers, 768 wide
  abstract_model = nnx.eval_shape(
      lambda: create_model("sequence_classification", cfg, 2))
  _, params, _, _ = partition.split_model(abstract_model)
  tx = optimizers.build_optimizer(default.get_config().optimizer, 100)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  mesh = parallelism.make_mesh(_parallelism("jit", (1, 2, 4)))
  return parallelism.state_shardings(
      state, mesh, default.get_config().parallelism.logical_axis_rules)


def test_bert_base_shardings_match_golden_table():
  """A change to sharding shows up in review as a change to the golden file.

  Regenerate with: UPDATE_GOLDEN=1 pytest tests/test_parallel.py -k golden
  """
  rows = parallelism.sharding_table(_bert_base_shardings()["params"])
  table = "".join(f"{path}\t{spec}\n" for path, spec in rows)
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.write_text(table)
  assert table == GOLDEN.read_text()
  assert "layers/0/attention/query/kernel\t('fsdp', 'tensor', None)" in table


def test_save_on_8_devices_restore_on_4_and_on_2x4(tmp_path, tiny_model_dir, batches):
  _, _, state = _trajectory(tiny_model_dir, batches, "jit", (1, 8, 1), steps=2)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, state, {"step": 2})
  expected = jax.device_get(state)
  rules = default.get_config().parallelism.logical_axis_rules
  for mesh_shape in [(1, 4, 1), (1, 2, 4)]:
    mesh = parallelism.make_mesh(_parallelism("jit", mesh_shape))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, parallelism.state_shardings(state, mesh, rules))
    with Checkpointer(tmp_path) as ckpt:
      _, restored, _ = ckpt.restore(target)
    for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                       jax.tree.leaves(target)):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert a.sharding == t.sharding
      assert len(a.sharding.device_set) == int(np.prod(mesh_shape))


def test_batch_not_divisible_fails_before_compiling(tmp_path, tiny_model_dir):
  config = quickstart.get_config()
  config.model.name, config.wandb.mode = str(tiny_model_dir), "disabled"
  config.batch_size = 12
  with pytest.raises(parallelism.ParallelismError,
                     match="config.batch_size=12 is not divisible by the "
                           "data-parallel size 8"):
    train.train_and_evaluate(config, str(tmp_path))
  config.batch_size, config.parallelism.strategy = 16, "pmap"
  config.parallelism.mesh_shape = (2, 4, 1)
  with pytest.raises(parallelism.ParallelismError, match="fsdp = tensor = 1"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_end_to_end_run_on_fsdp_and_tensor_mesh(tmp_path, tiny_model_dir):
  config = quickstart.get_config()
  config.model.name, config.wandb.mode = str(tiny_model_dir), "disabled"
  config.total_steps, config.eval_every_steps = 4, 4
  config.parallelism.mesh_shape = (2, 2, 2)
  config.model.dtype, config.model.remat = "bfloat16", True
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["final_step"] == 4 and 0.0 <= summary["eval/accuracy"] <= 1.0
  # Resume the finished run on a different mesh: restores, nothing to do.
  config.parallelism.mesh_shape = (8, 1, 1)
  assert train.train_and_evaluate(config, str(tmp_path))["final_step"] == 4


# --- launch.sh --------------------------------------------------------------


@pytest.fixture
def stub_gcloud(tmp_path):
  """A `gcloud` on PATH that records each call's arguments, one per line."""
  log = tmp_path / "gcloud.log"
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir()
  stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\x1f" "$@" >> {log}\n'
                  f'printf "\\n" >> {log}\n')
  stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}",
             WANDB_API_KEY="secret-key-123")
  return env, log


def _launch(env, *args):
  return subprocess.run(["bash", str(REPO / "launch.sh"), *args], env=env,
                        capture_output=True, text=True, timeout=60, check=False)


def _calls(log):
  if not log.exists():
    return []
  return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def test_launch_tpu_issues_create_scp_and_ssh_on_all_workers(stub_gcloud):
  env, log = stub_gcloud
  out = _launch(env, "tpu", "--name", "my-tpu", "--zone", "us-central2-b",
                "--create", "--accelerator-type", "v4-32",
                "experiments/quickstart.py", "--workdir", "gs://bucket/run 1",
                "--config.data.text_fields=('a b',)")
  assert out.returncode == 0, out.stderr
  calls = _calls(log)
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "create"]] + \
      [["compute", "tpus", "tpu-vm", "scp"]] * 2 + [["compute", "tpus", "tpu-vm", "ssh"]]
  assert calls[0][4:] == ["my-tpu", "--zone", "us-central2-b",
                          "--accelerator-type", "v4-32", "--version",
                          "tpu-ubuntu2204-base"]
  assert all("--worker=all" in c for c in calls[1:])
  ssh = calls[-1]
  command = ssh[ssh.index("--command") + 1]
  # A Python 3.12 venv by uv, not the image's Python (3.10 on this image).
  assert "uv venv -q --python 3.12 $venv" in command
  assert "uv pip install -q --python $venv/bin/python -e '.[tpu,tfds,hf]'" \
      in command
  # The remote shell must see the arguments exactly: run the tail through bash.
  tail = command.split("; . ~/.research-env; ")[1]
  argv = subprocess.run(["bash", "-c", f"printf '%s\\n' {tail}"],
                        capture_output=True, text=True, check=True,
                        env=dict(os.environ, HOME="/home/w")).stdout
  assert argv.splitlines() == [
      "/home/w/.venvs/research-bert/bin/python", "-m", "research.train",
      "--config", "experiments/quickstart.py",
      "--workdir", "gs://bucket/run 1", "--config.data.text_fields=('a b',)"]
  # The W&B key travels in a file, never in arguments or output.
  assert "secret-key-123" not in log.read_text() + out.stdout + out.stderr


def test_launch_dry_run_runs_nothing(stub_gcloud, tmp_path):
  env, log = stub_gcloud
  env["HOME"] = str(tmp_path / "home")
  out = _launch(env, "tpu", "--name", "t", "--zone", "z", "--dry-run",
                "experiments/quickstart.py")
  assert out.returncode == 0, out.stderr
  assert _calls(log) == []
  assert "+ gcloud compute tpus tpu-vm ssh t --zone z --worker=all" in out.stdout
  # The workers' environment, readable: Python >= 3.11 from uv, in a venv
  # kept between launches (rebuilt when setup.py or the choices change).
  worker = next(line for line in out.stdout.splitlines()
                if line.startswith("# on every worker: "))
  assert "python3 -m pip install -q --user uv" in worker
  assert "uv venv -q --python 3.12 $venv" in worker
  assert "$HOME/.venvs/research-bert/bin/python -m research.train" in worker
  assert 'want="$(sha256sum setup.py | cut -c1-16) python3.12 [tpu,tfds,hf]"' \
      in worker
  assert "secret-key-123" not in out.stdout
  out = _launch(env, "gpu", "--coordinator", "10.0.0.2:1234", "--num-processes",
                "2", "--process-id", "1", "--python", "3.11", "--extras",
                "cuda13,hf", "--dry-run", "experiments/quickstart.py")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "uv venv -q --python 3.11 $venv" in lines[0]
  assert "-e '.[cuda13,hf]'" in lines[0]
  assert lines[1] == (
      "+ env JAX_COORDINATOR_ADDRESS=10.0.0.2:1234 JAX_NUM_PROCESSES=2 "
      f"JAX_PROCESS_ID=1 {env['HOME']}/.venvs/research-bert/bin/python -m "
      "research.train --config experiments/quickstart.py --workdir "
      "workdirs/quickstart")
  assert not (tmp_path / "home").exists()  # nothing ran


def test_launch_setup_builds_the_venv_once(tmp_path):
  """`launch.sh setup` for real, with stand-ins for uv and pip's install."""
  home, bin_dir, calls = tmp_path / "home", tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  # uv: records its arguments; `uv venv` makes the venv directory.
  (bin_dir / "uv").write_text(
      f'#!/usr/bin/env bash\necho "uv $*" >> {calls}\n'
      'if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin"; fi\n')
  (bin_dir / "uv").chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
  for _ in range(2):
    out = _launch(env, "setup", "--python", "3.13")
    assert out.returncode == 0, out.stderr
  venv = home / ".venvs" / "research-bert"
  assert calls.read_text().splitlines() == [
      f"uv venv -q --python 3.13 {venv}",
      f"uv pip install -q --python {venv}/bin/python -e .[tpu,tfds,hf]"]
  assert (venv / ".stamp").read_text().endswith(" python3.13 [tpu,tfds,hf]\n")
  # Another choice rebuilds it.
  assert _launch(env, "setup", "--python", "3.12").returncode == 0
  assert calls.read_text().splitlines()[2] == (
      f"uv venv -q --python 3.12 {venv}")


@pytest.mark.parametrize("args,message", [
    ([], "usage"),
    (["cloud", "experiments/quickstart.py"], "unknown mode 'cloud'"),
    (["tpu", "experiments/quickstart.py"], "tpu needs --name NAME and --zone ZONE"),
    (["tpu", "--name", "t", "--zone", "z", "--create", "experiments/quickstart.py"],
     "--create needs --accelerator-type"),
    (["gpu", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2",
      "experiments/quickstart.py"], "--process-id must be in"),
    (["local", "experiments/missing.py"], "config file 'experiments/missing.py' not found"),
    (["local", "--bogus", "experiments/quickstart.py"], "unknown option '--bogus'"),
    (["tpu", "--name", "t", "--zone", "z", "--python", "3.10",
      "experiments/quickstart.py"], "--python must be 3.11 or newer"),
    (["setup", "experiments/quickstart.py"], "setup takes no CONFIG"),
])
def test_launch_bad_arguments_print_usage(stub_gcloud, args, message):
  env, log = stub_gcloud
  out = _launch(env, *args)
  assert out.returncode == 2
  assert message in out.stderr and "usage" in out.stderr.lower() or message == "usage"
  assert _calls(log) == []


def test_token_task_strategies_follow_one_trajectory(tmp_path, tiny_model_dir):
  """Per-token losses: devices hold different numbers of labelled tokens.

  Under shard_map each device's mean counts by its share of the global
  weight, so every strategy still follows the single-device trajectory.
  """
  from tests.test_tasks import _ner_config  # pylint: disable=import-outside-toplevel
  trajectories = {}
  for strategy, mesh_shape in [("jit", (1, 1, 1)), ("pmap", (8, 1, 1)),
                               ("jit", (2, 4, 1))]:
    config = _ner_config(tiny_model_dir, tmp_path, total_steps=6, **{
        "parallelism.strategy": strategy,
        "parallelism.mesh_shape": mesh_shape,
        "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0})
    run = train.build(config)
    state, losses = run.state, []
    for i in range(6):
      batch = run.train_batches.batch_at(i)
      state, metrics = run.train_step(state, run.frozen, parallelism.shard_batch(
          batch, run.batch_sharding), i)
      losses.append(float(metrics["loss"]))
    trajectories[(strategy, mesh_shape)] = (
        np.array(losses), jax.device_get(state["params"]))
  (ref_losses, ref_params), *others = trajectories.values()
  tokens = [int((run.train_batches.batch_at(i)["labels"] != -100).sum())
            for i in range(6)]
  assert len(set(tokens)) > 1 and ref_losses[-1] < ref_losses[0]
  for (losses, params), key in zip(others, list(trajectories)[1:]):
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(key))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, atol=2e-5, err_msg=str(key))
