"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, adapters, prefix tuning.

Zero-initialised updates leave the model exactly the base; merge/unmerge;
PEFT directories loaded by the live `peft` + `transformers` PyTorch models
with the same logits (and theirs onto ours); frozen weights bit-identical
and without optimiser state; AdaLoRA's budget on PEFT's schedule; exact
resume of a run whose optimiser state carries the rank allocation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import parallelism, restore, train
from research.methods import peft
from research.models import create_model, hf, make_dense
from research.methods.peft import allocation, hf_peft, layers
from research.methods.peft.prefix import PrefixEncoder
from research.training.checkpointing import Checkpointer
from tests.test_train import _restore_latest, _tiny_config

# Quick compiles (tiny models): no XLA optimisation passes, a shared cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")

TASK = "sequence_classification"
LABELS = 3
FACTORIES = {
    "lora": (layers.LoRADense, ("query", "value"),
             dict(lora_rank=4, lora_alpha=8.0)),
    "lora_all": (layers.LoRADense, ("all-linear",),
                 dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1)),
    "adalora": (layers.AdaLoRADense, ("query", "value", "attention.output"),
                dict(lora_rank=4, lora_alpha=8.0)),
    "houlsby": (layers.AdapterDense, ("attention.output", "output"),
                dict(reduction_factor=4)),
    "pfeiffer": (layers.AdapterDense, ("output",), dict(reduction_factor=8)),
}


def _match(name, targets):
  """Exact names for the adapters (their "output" is the FFN's only)."""
  if targets in (("query", "value"), ("all-linear",)):
    return layers.layer_name_matches(name, targets)
  return name in targets


def _load(model_dir, kind=None, seed=0):
  factory = make_dense
  if kind is not None:
    layer, targets, options = FACTORIES[kind]
    factory = peft.targeted_factory(make_dense, targets, layer,
                                    match=_match,
                                    **options)
  model, _ = hf.load_pretrained(str(model_dir), TASK, LABELS,
                                dense_factory=factory, seed=seed)
  return model


def _inputs(seed=0, batch=3, length=7):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 2000, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, 5:] = 0
  return ids, mask


def _randomise(model, names, seed=1):
  """Non-zero values for the method's zero-initialised weights."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    if path[-1] in names:
      scale = 1.0 if path[-1] == "lora_e" else 0.1  # A and B are ~0.02
      var[...] = scale * jax.random.normal(jax.random.fold_in(key, i), var.shape)


def _same_base(model, base):
  """Copies the base model's weights (and head) into `model`."""
  flat = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    if path in flat:
      var[...] = flat[path][...]
  nnx.update(model, state)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_zero_initialised_update_is_exactly_the_base(tiny_model_dir, kind):
  base = _load(tiny_model_dir)
  model = _load(tiny_model_dir, kind)
  added = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
           if p not in dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))]
  assert added, "the factory added no weights"
  _same_base(model, base)
  ids, mask = _inputs()
  np.testing.assert_array_equal(np.asarray(model(ids, mask)),
                                np.asarray(base(ids, mask)))
  np.testing.assert_array_equal(np.asarray(model.bert(ids, mask)[0]),
                                np.asarray(base.bert(ids, mask)[0]))
  # Non-zero updates do change the outputs (the test can fail).
  _randomise(model, ("lora_b", "lora_e", "adapter_up"))
  assert np.abs(np.asarray(model.bert(ids, mask)[0])
                - np.asarray(base.bert(ids, mask)[0])).max() > 1e-4


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_merge_unmerge_round_trip(tiny_model_dir, kind):
  model = _load(tiny_model_dir, kind)
  _randomise(model, ("lora_b", "lora_e"))
  kernels = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(
      nnx.state(model, nnx.Param)) if p[-1] == "kernel"}
  ids, mask = _inputs()
  unmerged = np.asarray(model(ids, mask))
  layers.merge(model)
  assert all(layer.merged for _, layer in layers.low_rank_layers(model))
  np.testing.assert_allclose(np.asarray(model(ids, mask)), unmerged, atol=1e-5)
  changed = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if p[-1] == "kernel" and not np.array_equal(v[...], kernels[p])]
  assert len(changed) == len(layers.low_rank_layers(model))
  layers.unmerge(model)
  np.testing.assert_allclose(np.asarray(model(ids, mask)), unmerged, atol=1e-6)
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if p[-1] == "kernel":
      np.testing.assert_allclose(np.asarray(v[...]), kernels[p], atol=1e-6)


def _torch_logits(model, ids, mask):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_peft_loads_our_export_with_the_same_logits(tmp_path, tiny_model_dir, kind):
  peft_lib = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  model = _load(tiny_model_dir, kind)
  _randomise(model, ("lora_b", "lora_e"))
  base_dir = hf.export(model, tmp_path / "base", TASK)  # kernels only: the base
  adapter = hf_peft.export(model, tmp_path / "adapter",
                           options={"target_r": 2, "tinit": 1, "total_step": 10})
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["peft_type"] == ("ADALORA" if kind == "adalora" else "LORA")
  base = transformers.BertForSequenceClassification.from_pretrained(
      str(base_dir)).eval()
  # Their classifier differs from ours until the adapter's replaces it.
  theirs = peft_lib.PeftModel.from_pretrained(base, str(adapter)).eval()
  result = theirs.load_adapter(str(adapter), adapter_name="check")
  assert [k for k in result.missing_keys if ".check" in k] == []
  assert result.unexpected_keys == []
  theirs.set_adapter("default")
  ids, mask = _inputs()
  ours = np.asarray(model(ids, mask))
  np.testing.assert_allclose(_torch_logits(theirs, ids, mask), ours, atol=1e-4)
  # The adapters matter: the base alone differs.
  plain = transformers.BertForSequenceClassification.from_pretrained(
      str(base_dir)).eval()
  assert np.abs(_torch_logits(plain, ids, mask) - ours).max() > 1e-5


def test_trained_pooler_goes_to_peft_and_back(tmp_path, tiny_model_dir):
  """`pooler=True`: PEFT's modules_to_save gets "pooler"; both ways agree."""
  peft_lib = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  base_dir = hf.export(_load(tiny_model_dir), tmp_path / "base", TASK)
  model = _load(tiny_model_dir, "lora")
  _randomise(model, ("lora_b",))
  pooler = model.bert.pooler.kernel
  pooler[...] = pooler[...] + 0.5 * jax.random.normal(jax.random.key(3),
                                                      pooler.shape)
  adapter = hf_peft.export(model, tmp_path / "adapter", options={"pooler": True})
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert "pooler" in config["modules_to_save"]
  base = transformers.BertForSequenceClassification.from_pretrained(
      str(base_dir)).eval()
  theirs = peft_lib.PeftModel.from_pretrained(base, str(adapter)).eval()
  ids, mask = _inputs()
  ours = np.asarray(model(ids, mask))
  np.testing.assert_allclose(_torch_logits(theirs, ids, mask), ours, atol=1e-4)
  back, report = hf_peft.load(adapter, str(base_dir), TASK, LABELS)
  assert "bert.pooler.dense.weight" in report.loaded
  np.testing.assert_allclose(np.asarray(back(ids, mask)), ours, atol=1e-5)
  # Without the option the pooler stays the base's: the logits differ.
  plain = hf_peft.export(model, tmp_path / "plain")
  again, _ = hf_peft.load(plain, str(base_dir), TASK, LABELS)
  assert np.abs(np.asarray(again(ids, mask)) - ours).max() > 1e-3


def test_peft_lora_directory_loads_onto_our_model(tmp_path, tiny_model_dir):
  peft_lib = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  base_dir = hf.export(_load(tiny_model_dir), tmp_path / "base", TASK)
  base = transformers.BertForSequenceClassification.from_pretrained(
      str(base_dir))
  theirs = peft_lib.get_peft_model(base, peft_lib.LoraConfig(
      r=4, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
      task_type="SEQ_CLS"))
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      if "lora_B" in name or "classifier" in name:
        p.normal_(0.0, 0.1)
  theirs.save_pretrained(str(tmp_path / "adapter"))
  ours, report = hf_peft.load(tmp_path / "adapter", str(base_dir), TASK, LABELS)
  assert report.unexpected == [] and report.missing == []
  # query, key, value, attention output, intermediate, output, pooler.
  assert len(layers.low_rank_layers(ours)) == 2 * 6 + 1
  ids, mask = _inputs(1)
  np.testing.assert_allclose(np.asarray(ours(ids, mask)),
                             _torch_logits(theirs.eval(), ids, mask), atol=1e-4)


def test_peft_config_we_cannot_reproduce_is_refused(tmp_path, tiny_model_dir):
  model = _load(tiny_model_dir, "lora")
  out = hf_peft.export(model, tmp_path / "a")
  config = json.loads((out / "adapter_config.json").read_text())
  config["use_dora"] = True
  (out / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match="use_dora=True is not supported"):
    hf_peft.load(out, str(tiny_model_dir), TASK, LABELS)


# --- Training through the methods -----------------------------------------------

METHODS = {
    "lora": ({"r": 4, "alpha": 8.0, "dropout": 0.1}, ("lora_a", "lora_b")),
    "adalora": ({"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
                ("lora_a", "lora_e", "lora_b")),
    "adapters": ({"kind": "houlsby", "reduction_factor": 8},
                 ("adapter_down", "adapter_down_bias", "adapter_up",
                  "adapter_up_bias", "scale", "bias")),
    "prefix_tuning": ({"length": 3, "projection": True, "projection_size": 16},
                      ("embedding", "hidden", "hidden_bias", "output",
                       "output_bias")),
}


def _method_config(model_dir, name, steps=4, **overrides):
  config = _tiny_config(model_dir, total_steps=steps, eval_every_steps=steps,
                        methods=(name,), **overrides)
  with config.unlocked():
    config.method_options[name] = dict(METHODS[name][0])
  return config


@pytest.mark.parametrize("name", list(METHODS))
def test_training_updates_only_the_method_and_head(tiny_model_dir, name):
  run = train.build(_method_config(tiny_model_dir, name))
  trained = [p for p, _ in nnx.to_flat_state(run.state["params"])]
  assert {p[-1] for p in trained if p[0] == "bert"} <= set(METHODS[name][1])
  assert any(p[0] == "classifier" for p in trained)
  frozen = [p for p, _ in nnx.to_flat_state(run.frozen[0])]
  assert any(p[-1] == "kernel" for p in frozen)
  before = jax.device_get(run.frozen)
  start = jax.device_get(run.state["params"])
  state = run.state
  for step in range(4):
    batch = parallelism.shard_batch(run.train_batches.batch_at(step),
                                    run.batch_sharding)
    state, metrics = run.train_step(state, run.frozen, batch, step)
    assert np.isfinite(metrics["loss"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(run.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moments = [p for p, _ in nnx.to_flat_state(
      optax_mu(state["opt_state"]))]
  assert sorted(moments) == sorted(trained)
  moved = [p for (p, a), (_, b) in zip(nnx.to_flat_state(start),
                                       nnx.to_flat_state(state["params"]))
           if p[0] == "bert" and not np.array_equal(a[...], b[...])]
  assert moved, "no method weight was trained"


@pytest.mark.parametrize("name", ["lora", "bitfit"])
def test_pooler_option_trains_the_pooler(tiny_model_dir, name):
  config = _tiny_config(tiny_model_dir, total_steps=2, methods=(name,))
  with config.unlocked():
    config.method_options[name] = {**METHODS.get(name, ({},))[0], "pooler": True}
  run = train.build(config)
  trained = {p for p, _ in nnx.to_flat_state(run.state["params"])}
  assert ("bert", "pooler", "kernel") in trained
  frozen = {p for p, _ in nnx.to_flat_state(run.frozen[0])}
  assert ("bert", "pooler", "kernel") not in frozen
  # The default leaves it frozen, as PEFT does.
  with config.unlocked():
    config.method_options[name] = dict(METHODS.get(name, ({},))[0])
  run = train.build(config)
  assert ("bert", "pooler", "kernel") in {
      p for p, _ in nnx.to_flat_state(run.frozen[0])}


def optax_mu(opt_state):
  """Adam's first moments, inside AdaLoRA's wrapper or not."""
  inner = getattr(opt_state, "inner", opt_state)
  return inner.mu


def test_lora_dropout_is_on_in_training_only(tiny_model_dir):
  model = _load(tiny_model_dir, "lora_all")  # lora_dropout=0.1
  _randomise(model, ("lora_b",))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  switches = [v for p, v in nnx.to_flat_state(rest) if p[-1] == "dropout_on"]
  assert len(switches) == 2 * 6 + 1 and not any(bool(v[...]) for v in switches)
  ids, mask = _inputs()
  run = lambda r: np.asarray(nnx.merge(graphdef, params, r)(ids, mask))  # pylint: disable=unnecessary-lambda-assignment
  plain = run(rest)
  # Evaluation (the state as stored): no dropout, the same every time.
  np.testing.assert_array_equal(run(rest), plain)
  one = run(layers.with_dropout_keys(rest, jax.random.key(1)))
  two = run(layers.with_dropout_keys(rest, jax.random.key(2)))
  assert np.abs(one - plain).max() > 1e-6 and np.abs(one - two).max() > 1e-6
  np.testing.assert_array_equal(
      run(layers.with_dropout_keys(rest, jax.random.key(1))), one)
  keys = [np.asarray(v[...]).tobytes() for p, v in nnx.to_flat_state(
      layers.with_dropout_keys(rest, jax.random.key(1))) if p[-1] == "dropout_key"]
  assert len(set(keys)) == len(keys)  # one mask stream per layer


def test_adalora_reaches_its_budget_on_schedule(tiny_model_dir):
  options = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3,
             "delta_t": 2, "orth_reg_weight": 0.1}
  steps = 12
  config = _method_config(tiny_model_dir, "adalora", steps=steps)
  with config.unlocked():
    config.method_options.adalora = options
  run = train.build(config)
  layers_n = 2 * 2  # query and value of 2 layers
  init, target = 4 * layers_n, 2 * layers_n
  state, zeros_after = run.state, []
  for step in range(steps):
    batch = parallelism.shard_batch(run.train_batches.batch_at(step),
                                    run.batch_sharding)
    state, _ = run.train_step(state, run.frozen, batch, step)
    e = [np.asarray(v[...]) for p, v in nnx.to_flat_state(state["params"])
         if p[-1] == "lora_e"]
    zeros_after.append(sum(int((x == 0).sum()) for x in e))
  for t in range(1, steps + 1):
    budget, masked = allocation.budget_schedule(
        t, init, target, tinit=2, tfinal=3, total_step=steps, delta_t=2)
    if t <= 2:
      assert zeros_after[t - 1] == 0 or t == 1 and zeros_after[0] == init
    if masked:
      assert zeros_after[t - 1] == init - budget, (t, zeros_after)
  pattern = allocation.rank_pattern(state["opt_state"])
  assert sum(int(np.asarray(v).sum()) for v in pattern.values()) == target
  assert zeros_after[-1] == init - target


def test_adalora_resume_is_exact(tmp_path, tiny_model_dir, monkeypatch):
  config = _method_config(tiny_model_dir, "adalora", steps=6,
                          log_every_steps=1)
  with config.unlocked():
    config.method_options.adalora = {"init_r": 4, "target_r": 2, "tinit": 1,
                                     "tfinal": 2, "delta_t": 1}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  real = Checkpointer.reached_preemption
  monkeypatch.setattr(Checkpointer, "reached_preemption",
                      lambda self, step: step == 3 or real(self, step))
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, resumed)
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  train.train_and_evaluate(config, resumed)
  (_, a, _), (_, b, _) = _restore_latest(straight), _restore_latest(resumed)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_prefix_encoder_projection_folds_to_the_same_prefixes(tiny_model_dir):
  model = _load(tiny_model_dir)
  enc = PrefixEncoder(model.cfg, 3, projection=True, projection_size=8,
                      rngs=nnx.Rngs(params=0))
  model.bert.prefix_encoder = enc
  ids, mask = _inputs()
  with_mlp = np.asarray(model(ids, mask))
  explicit = np.asarray(model(ids, mask, prefix_kv=enc()))
  np.testing.assert_array_equal(with_mlp, explicit)
  enc.fold()
  assert [p[-1] for p, _ in nnx.to_flat_state(nnx.state(enc))] == ["prefix"]
  np.testing.assert_allclose(np.asarray(model(ids, mask)), with_mlp, atol=1e-6)
  model.bert.prefix_encoder = None
  assert np.abs(np.asarray(model(ids, mask)) - with_mlp).max() > 1e-5


def test_lora_run_exports_merged_and_as_peft(tmp_path, tiny_model_dir):
  from research import export  # pylint: disable=import-outside-toplevel
  config = _method_config(tiny_model_dir, "lora")
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert 0 < summary["params/trainable"] < 0.01 * summary["params/total"]
  restored = restore.restore_run(workdir, "latest")
  ids, mask = _inputs()
  trained = np.asarray(restored.model(ids, mask))
  merged_dir = export.export_run(workdir, str(tmp_path / "merged"), "latest")
  merged, report = hf.load_pretrained(merged_dir, TASK, 2)
  assert report.missing == []
  np.testing.assert_allclose(np.asarray(merged(ids, mask)), trained, atol=1e-5)
  peft_dir = export.export_run(workdir, str(tmp_path / "peft"), "latest",
                               peft_dir=True)
  ours, _ = hf_peft.load(peft_dir, str(tiny_model_dir), TASK, 2)
  np.testing.assert_allclose(np.asarray(ours(ids, mask)), trained, atol=1e-5)
