"""Pre-training: masked LM on a corpus, NSP, resume, FSDP, HF interop, errors.

Tiny models (2 layers, 32 wide, MiniLM's tokenizer) on a few hundred
WikiText-2 lines; every run reads a corpus through grain as
`research.train` does.
"""

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import _pretrain_common as common
from experiments import continue_pretraining, pretrain_bert_base
from research import bench, data, restore, tasks, train
from research.configs import ConfigError, validate
from research.data import corpus as corpus_lib
from research.data.corpus_batching import CorpusBatcher, CorpusSplit
from research.data import corpus_batching
from research.data.corpus_batching import sentence_pairs, sentence_starts
from research.data.corpus_batching import sentence_table
from research.evaluators import pre_training
from research.models import BertConfig, create_model, hf
from research.tasks import masked_lm
from research.training.checkpointing import Checkpointer
from research.models import heads
from tests.conftest import SHARED_DATA, shared_data

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles(compilation_cache):
  del compilation_cache


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  """(train, valid) files: the first non-empty WikiText-2 lines."""
  out = tmp_path_factory.mktemp("texts")
  paths = []
  for name, lines in (("wiki.train.tokens", 300), ("wiki.valid.tokens", 60)):
    rows = [l for l in shared_data("wikitext", name).read_text().splitlines() if l.strip()]
    path = out / name
    path.write_text("\n".join(rows[:lines]) + "\n")
    paths.append(str(path))
  return paths


def _config(texts, **overrides):
  c = common.corpus_config(
      model="all-minilm-l6-v2", train_files=(texts[0],),
      eval_files=(texts[1],), architecture=common.TINY, max_length=32,
      batch_size=16, total_steps=12, learning_rate=2e-2, warmup_steps=2,
      eval_rows=64)
  c.wandb.mode = "disabled"
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 3
  c.log_every_steps = 1
  c.parallelism.mesh_shape = (1, 1, 1)
  c.model.hidden_dropout = 0.0  # FSDP vs one device: same numbers
  c.model.attention_dropout = 0.0
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) /
                                  "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _restore(workdir, step=None):
  with Checkpointer(str(workdir)) as ckpt:
    return ckpt.restore(None, step=step)


class _Killed(Exception):
  pass


def test_corpus_run_logs_heldout_mlm_metrics_and_resumes_exactly(
    texts, tmp_path, monkeypatch):
  """Killed after checkpoint 9 (inside step 10), rerun: same params, Adam
  moments, grain position, masks and losses as an uninterrupted run."""
  config = _config(texts)
  config.data.cache_dir = str(tmp_path / "cache")
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  summary = train.train_and_evaluate(config, str(straight))
  # Held-out masked-LM metrics, logged as every metric is.
  assert summary["eval/perplexity"] == pytest.approx(
      np.exp(summary["eval/loss"]), rel=1e-6)
  # From ln(30522) = 10.3 nats (a uniform guess) down by > 2 nats.
  assert summary["eval/loss"] < np.log(30522) - 2.0
  assert 0.0 < summary["eval/accuracy"] < 1.0
  losses = _losses(straight)
  assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 2.0

  real = Checkpointer.reached_preemption

  def die_at_10(self, step):
    if step == 10:
      raise _Killed()  # no save: as a SIGKILL after checkpoint 9
    return real(self, step)

  monkeypatch.setattr(Checkpointer, "reached_preemption", die_at_10)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, str(killed))
  monkeypatch.setattr(Checkpointer, "reached_preemption", real)
  step, _, extras = _restore(killed)
  assert step == 9
  # grain's iterator position is in the checkpoint: the next example.
  assert extras["data_state"]["next_index"] == 9
  train.train_and_evaluate(config, str(killed))

  step_a, state_a, extras_a = _restore(straight)
  step_b, state_b, extras_b = _restore(killed)
  assert step_a == step_b == 12
  assert extras_a["data_state"] == extras_b["data_state"] == {"next_index": 12}
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 20  # params and Adam moments
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Steps 10-12 after the resume: the same batches and masks, same losses.
  assert _losses(killed) == losses


def _corpus(texts, tmp_path, seq_len=32, packing="full"):
  tokenizer = data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
  info = corpus_lib.build_corpus(corpus_lib.TextFiles([texts[0]]), tokenizer,
                                 str(tmp_path / f"rows-{packing}"),
                                 seq_len=seq_len, packing=packing)
  return tokenizer, corpus_lib.Corpus(info.directory)


def test_restored_iterator_gives_the_same_examples_and_masks(texts, tmp_path):
  tokenizer, corpus = _corpus(texts, tmp_path)
  split = CorpusSplit("train", corpus)
  task_config = _config(texts)
  task = tasks.load(task_config, tokenizer)
  first = CorpusBatcher(split, 8, seed=3)
  straight = list(first.iterate(0, 8))
  state = first.state_at(5)
  resumed = CorpusBatcher(split, 8, seed=3)
  resumed.restore_state(state)
  again = list(resumed.iterate(5, 3))
  for a, b in zip(straight[5:], again):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    key = jax.random.key(7)
    np.testing.assert_array_equal(task.transform(a, key)["labels"],
                                  task.transform(b, key)["labels"])
  # NSP pairs too: the resumed iterator cuts and draws as the first did.
  table = sentence_table(tokenizer)
  nsp = CorpusBatcher(split, 8, seed=3, next_sentence=True,
                      sentence_table=table)
  straight_nsp = list(nsp.iterate(0, 8))
  resumed_nsp = CorpusBatcher(split, 8, seed=3, next_sentence=True,
                              sentence_table=table)
  resumed_nsp.restore_state(nsp.state_at(5))
  for a, b in zip(straight_nsp[5:], resumed_nsp.iterate(5, 3)):
    for k in ("input_ids", "token_type_ids", "next_sentence_label"):
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(straight_nsp[5]["input_ids"],
                            straight[5]["input_ids"])  # pairs were made
  # A position from another step is refused, naming the corpus.
  wrong = CorpusBatcher(split, 8, seed=3)
  wrong.restore_state(state)
  with pytest.raises(data.DataError, match="data position"):
    next(wrong.iterate(4, 1))
  # Two processes: each reads its rows; together the one-process batch.
  parts = [CorpusBatcher(split, 8, seed=3, process_index=p,
                         process_count=2).batch_at(2)["input_ids"]
           for p in (0, 1)]
  whole = first.batch_at(2)["input_ids"]
  np.testing.assert_array_equal(np.stack(parts, 1).reshape(whole.shape), whole)


def test_sentence_pairs_follow_bert(texts, tmp_path):
  """WikiText rows: [CLS] A [SEP] B [SEP] with token types; A is cut at a
  sentence end wherever the row has one; an IsNext B follows A."""
  tokenizer, corpus = _corpus(texts, tmp_path, packing="doc")
  rows = CorpusBatcher(CorpusSplit("train", corpus), 64,
                       seed=0).batch_at(0)["input_ids"]
  cls, sep, pad = (tokenizer.cls_token_id, tokenizer.sep_token_id,
                   tokenizer.pad_token_id)
  table = sentence_table(tokenizer)
  ids, types, labels = sentence_pairs(rows, np.random.default_rng(0),
                                      cls_id=cls, sep_id=sep, pad_id=pad,
                                      table=table)
  assert 0.3 < labels.mean() < 0.7
  at_boundary = 0
  for row, new, tt, label in zip(rows, ids, types, labels):
    content = row[1:(row != pad).sum() - 1]
    n = int((new != pad).sum())
    seps = np.flatnonzero(new[:n] == sep)
    assert new[0] == cls and seps[-1] == n - 1 and n <= len(row)
    a, b = new[1:seps[0]], new[seps[0] + 1:n - 1]
    np.testing.assert_array_equal(tt[:seps[0] + 1], 0)
    np.testing.assert_array_equal(tt[seps[0] + 1:n], 1)
    assert len(a) and len(b)
    if len(sentence_starts(content, table)):
      assert table[a[-1]] & corpus_batching.END
      at_boundary += 1
    if label == 0:  # B is the text that follows A in the row
      pair = np.concatenate([a, b])
      assert any(np.array_equal(pair, content[k:k + len(pair)])
                 for k in range(len(content) - len(pair) + 1))
  assert at_boundary >= 16  # WikiText rows of 32 tokens: most hold one


def _bpe_tokenizer():
  """A small byte-level BPE (RoBERTa's kind) trained on WikiText lines."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  lines = shared_data("wikitext", "wiki.train.tokens").read_text().splitlines()[:2000]
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(lines + [_SENTENCES] * 5, vocab_size=2000,
                          special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                          show_progress=False)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe._tokenizer, cls_token="<s>", sep_token="</s>",  # pylint: disable=protected-access
      pad_token="<pad>", unk_token="<unk>")


_SENTENCES = ('Dr. Smith went to the U.S. in 3.5 days. He left! Then 1 @.@ 5 '
              'km . "Yes." she said... ok?! Fine.')


@pytest.mark.parametrize("vocab", ["wordpiece", "bpe"])
def test_sentence_starts_from_token_ids(vocab):
  """The same four sentence starts from WordPiece and byte-level BPE ids;
  titles, initials, decimals, WikiText's "@.@" and a quoted period are not
  boundaries."""
  tokenizer = (data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
               if vocab == "wordpiece" else _bpe_tokenizer())
  ids = np.asarray(tokenizer(_SENTENCES, add_special_tokens=False)[
      "input_ids"])
  table = sentence_table(tokenizer)
  starts = sentence_starts(ids, table)
  words = [tokenizer.decode(ids[s:]).split()[0].lower() for s in starts]
  assert words == ["he", "then", "ok?!", "fine."]
  assert [tokenizer.decode(ids[s - 1:s]).strip() for s in starts] == [
      ".", "!", ".", "!"]
  assert not table[tokenizer.all_special_ids].any()


def _rows(tokenizer, texts, width=32):
  """[CLS] text [SEP] [PAD]... rows, int32 [len(texts), width]."""
  out = np.full((len(texts), width), tokenizer.pad_token_id, np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) <= width - 1  # A + B never truncated
    out[i, :len(ids)] = ids
  return out


def test_sentence_pairs_cut_at_boundaries_or_at_random():
  """Hand-made rows, 300 copies each: A is whole sentences and an IsNext B
  exactly the sentences after them; a NotNext B starts at a sentence of
  another row; a row without a boundary is cut anywhere; labels 1/2."""
  tokenizer = data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
  table = sentence_table(tokenizer)
  texts = ["the cat sat on the mat. it was warm! dogs barked.",
           "rain fell all day. the river rose. people left.",
           "dr. smith went to the u.s. in 3.5 days"]  # no boundary
  distinct = _rows(tokenizer, texts)
  special = dict(cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
                 pad_id=tokenizer.pad_token_id)
  contents = [r[1:(r != special["pad_id"]).sum() - 1] for r in distinct]
  starts = [sentence_starts(c, table) for c in contents]
  assert [len(s) for s in starts] == [2, 2, 0]
  copies = 300
  rows = np.tile(distinct, (copies, 1))
  ids, _, labels = sentence_pairs(rows, np.random.default_rng(0),
                                  table=table, **special)
  cuts = {0: set(), 1: set(), 2: set()}
  for i, (new, label) in enumerate(zip(ids, labels)):
    kind, content = i % 3, contents[i % 3]
    n = int((new != special["pad_id"]).sum())
    mid = int(np.flatnonzero(new == special["sep_id"])[0])
    a, b = new[1:mid], new[mid + 1:n - 1]
    cut = len(a)
    np.testing.assert_array_equal(a, content[:cut])  # A: the row's start
    cuts[kind].add(cut)
    if kind < 2:
      assert cut in starts[kind] and table[a[-1]] & corpus_batching.END
    if label == 0:  # exactly the text that followed
      np.testing.assert_array_equal(b, content[cut:])
    else:  # another row's text, from a sentence start where it has one
      assert any(np.array_equal(b, c[s:s + len(b)])
                 for c, st in zip(contents, starts)
                 for s in (st if len(st) else range(len(c))))
  assert cuts[0] == set(starts[0]) and cuts[1] == set(starts[1])
  # The fallback: random cuts, most of them inside a sentence.
  assert len(cuts[2]) > len(contents[2]) // 2
  # Labels: Bernoulli(1/2) per row; 4 binomial standard deviations
  # (sqrt(0.25 / 900) = 0.017) is a bound a fair draw breaks once in 15000.
  assert abs(labels.mean() - 0.5) < 4 * np.sqrt(0.25 / len(labels))
  # Resume: the draws are a function of the generator's seed alone.
  again = sentence_pairs(rows, np.random.default_rng(0), table=table,
                         **special)
  np.testing.assert_array_equal(again[0], ids)


def test_nsp_accuracy_and_loss_on_a_hand_made_batch():
  """nsp_sums per batch (padding rows out), summed by the evaluator."""
  logits = np.array([[2., 1.], [0., 3.], [1., 0.], [5., -5.], [0., 2.]],
                    np.float32)
  labels = np.array([0, 1, 1, 1, 0])
  weights = np.array([1., 1., 1., 0., 1.], np.float32)  # row 3: padding
  # Rows 0, 1 right, 2 and 4 wrong: 2 of 4 real rows.
  ce = [np.log1p(np.exp(-1.)), np.log1p(np.exp(-3.)), np.log1p(np.exp(1.)),
        np.log1p(np.exp(2.))]
  totals = []
  for part in (slice(0, 2), slice(2, 5)):  # two evaluation batches
    sums = masked_lm.nsp_sums(jnp.asarray(logits[part]),
                              jnp.asarray(labels[part]),
                              jnp.asarray(weights[part]))
    totals.append({**jax.tree.map(np.asarray, sums), "loss": 6.0,
                   "weight": 3.0})
  config = ml_collections.ConfigDict({"metrics": ()})
  make = lambda head: pre_training.Evaluator(  # pylint: disable=unnecessary-lambda-assignment
      name="eval", task=types.SimpleNamespace(HEAD=head), split=None,
      batcher=None, make_step=lambda logits: None, sharding=None,
      config=config, metrics=("nsp_accuracy", "nsp_loss"))
  scores = make(heads.PreTraining).scores([], [], totals)
  assert scores["nsp_accuracy"] == 0.5
  assert scores["nsp_loss"] == pytest.approx(np.mean(ce), rel=1e-6)
  assert scores["loss"] == 2.0  # the masked-LM loss, as before
  with pytest.raises(ConfigError, match="next_sentence=True"):
    make(heads.MaskedLM)


def test_nsp_head_matches_transformers(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64)
  model = create_model("pre_training", cfg, seed=1)
  out = hf.export(model, tmp_path / "hf", "pre_training")
  theirs = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
  ids = np.random.default_rng(0).integers(1000, 2000, (2, 12)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  mask = np.ones_like(ids)
  mlm, nsp = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types, dtype=torch.long))
  np.testing.assert_allclose(mlm, ref.prediction_logits.numpy(), atol=2e-4)
  np.testing.assert_allclose(nsp, ref.seq_relationship_logits.numpy(),
                             atol=2e-4)
  # Importing BertForPreTraining gives the same model back.
  again, report = hf.load_pretrained(str(out), "pre_training")
  assert not report.missing and not report.unexpected
  np.testing.assert_allclose(again(jnp.asarray(ids), jnp.asarray(mask),
                                   jnp.asarray(types))[1], nsp, atol=1e-6)



def test_fill_mask_pipeline_on_exported_model_gives_our_top5(tmp_path, caplog):
  """MiniLM (no MLM head: a new one, reported), exported as BertForMaskedLM."""
  import transformers  # pylint: disable=import-outside-toplevel
  with caplog.at_level("INFO", logger="research.models.hf"):
    model, report = hf.load_pretrained("all-minilm-l6-v2", "masked_lm",
                                       seed=0)
  assert {"transform.kernel", "decoder_bias"} <= set(report.missing)
  assert "newly initialised" in caplog.text and "transform" in caplog.text
  out = hf.export(model, tmp_path / "mlm", "masked_lm",
                  tokenizer_dir=hf.resolve("all-minilm-l6-v2"))
  tokenizer = data.load_tokenizer(str(out))
  fill = transformers.pipeline("fill-mask", model=str(out),
                               tokenizer=str(out), top_k=5, device="cpu")
  sentences = ["the capital of france is [MASK].",
               "she went to the [MASK] to buy bread.",
               "deep learning models need a lot of [MASK]."]
  for text in sentences:
    enc = tokenizer(text, return_tensors="np")
    logits = model(jnp.asarray(enc["input_ids"]),
                   jnp.asarray(enc["attention_mask"]),
                   jnp.asarray(enc["token_type_ids"]))
    where = int(np.flatnonzero(enc["input_ids"][0] ==
                               tokenizer.mask_token_id)[0])
    ours = list(np.argsort(-np.asarray(logits[0, where]))[:5])
    assert [r["token"] for r in fill(text)] == ours


@pytest.mark.slow
def test_pod_recipe_on_fsdp_mesh_follows_one_device(texts, tmp_path):
  """The pod recipe validates (both phases, both optimisers); its tiny
  version trains on 8 simulated devices (fsdp=8) as on one device."""
  for arg in ("phase=1,files=a.txt", "phase=2,init=/m,files=a.txt,"
              "optimizer=lamb,mesh=4x8x1"):
    validate(pretrain_bert_base.get_config(arg))
  with pytest.raises(ValueError, match="phase=2 starts from phase 1"):
    pretrain_bert_base.get_config("phase=2,files=a.txt")
  assert len(jax.devices()) == 8
  arg = f"tiny=1,files={texts[0]},eval={texts[1]},batch=16,warmup=1,lr=0.003"
  losses, summaries = {}, {}
  for mesh in ("1x8x1", "1x1x1"):
    config = pretrain_bert_base.get_config(f"{arg},mesh={mesh}")
    config.wandb.mode = "disabled"
    config.model.hidden_dropout = config.model.attention_dropout = 0.0
    config.data.cache_dir = str(tmp_path / "cache")
    summaries[mesh] = train.train_and_evaluate(config, str(tmp_path / mesh))
    losses[mesh] = _losses(tmp_path / mesh)
  # Held-out NSP accuracy and loss, logged beside the masked-LM metrics.
  logged = [json.loads(l) for l in (tmp_path / "1x1x1" / "metrics.jsonl"
                                    ).read_text().splitlines()]
  last = [r for r in logged if "eval/nsp_accuracy" in r][-1]
  for mesh, summary in summaries.items():
    assert summary["eval/nsp_accuracy"] == pytest.approx(
        last["eval/nsp_accuracy"], abs=1e-6), mesh
    assert 0.0 < summary["eval/nsp_accuracy"] < 1.0
    # 4 steps from a uniform guess: still close to ln(2).
    assert summary["eval/nsp_loss"] == pytest.approx(np.log(2), abs=0.2)
    assert summary["eval/perplexity"] == pytest.approx(
        np.exp(summary["eval/loss"]), rel=1e-6)
  assert len(losses["1x8x1"]) == 4
  # MLM + NSP (the recipe's default): ln(30522) + ln(2) at the start.
  assert losses["1x1x1"][1] == pytest.approx(np.log(30522) + np.log(2), abs=0.3)
  assert restore.restore_run(str(tmp_path / "1x1x1")).task.HEAD is heads.PreTraining
  np.testing.assert_allclose(list(losses["1x8x1"].values()),
                             list(losses["1x1x1"].values()), rtol=2e-5)


@pytest.mark.parametrize("case", ["empty", "binary", "small", "rate_high",
                                  "rate_zero", "missing"])
def test_bad_input_is_a_clear_error(texts, tmp_path, case):
  bad = tmp_path / "bad.txt"
  config = _config(texts)
  config.data.cache_dir = str(tmp_path / "cache")
  if case == "empty":
    bad.write_text("\n  \n")
    error, match = data.DataError, f"{bad}: empty corpus"
  elif case == "binary":
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    error, match = data.DataError, f"{bad}, line 1: not valid UTF-8.*must be UTF-8 text"
  elif case == "small":
    bad.write_text("just a few words\n")
    error, match = data.DataError, "1 rows .* fewer than one batch \\(batch_size=16\\)"
  elif case == "missing":
    bad = tmp_path / "nope*.txt"
    error, match = data.DataError, "config.task_options.train_files: no such file"
  else:
    config.task_options.mask_probability = 1.5 if case == "rate_high" else 0.0
    error, match = ConfigError, "config.task_options.mask_probability=.* must be in \\(0, 1\\)"
  config.task_options.train_files = (str(bad),)
  with pytest.raises(error, match=match):
    train.build(config, str(tmp_path / "run"))


def test_bench_counts_the_tied_decoder(texts, tmp_path):
  """MLM tokens/s and MFU: the analytic FLOPs (with the tied decoder, a
  vocab x hidden matmul per token) agree with XLA's count of the step."""
  config = _config(texts, total_steps=4)
  config.data.cache_dir = str(tmp_path / "cache")
  result = bench.benchmark(config, steps=4, warmup=1, peak_tflops=1.0)
  column = result["columns"][0]
  assert column["real_tokens_per_s"] > 0 and 0 < column["mfu"] < 1
  assert column["cost_analysis"]["ratio"] == pytest.approx(1.0, abs=0.1)


def test_continue_pretraining_tapt_reads_a_table_column():
  config = continue_pretraining.get_config(
      f"table={SHARED_DATA / 'glue_cola' / 'train.tsv'},"
      f"eval={SHARED_DATA / 'glue_cola' / 'dev.tsv'},columns=sentence")
  validate(config)
  assert config.task_options.corpus == "" and config.data.text_fields == (
      "sentence",)


def test_export_keeps_the_base_pooler(tmp_path, tiny_model_dir):
  """A masked-LM export (no pooler) gets the base's, for fine-tuning."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from research.export import keep_base_pooler  # pylint: disable=import-outside-toplevel
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  mlm = hf.export(create_model("masked_lm", cfg, seed=1), tmp_path / "mlm",
                  "masked_lm")
  assert not any("pooler" in k for k in load_file(str(mlm / "model.safetensors")))
  assert keep_base_pooler(mlm, tiny_model_dir) == [
      "bert.pooler.dense.weight", "bert.pooler.dense.bias"]
  grafted = load_file(str(mlm / "model.safetensors"))
  base = load_file(str(tiny_model_dir / "model.safetensors"))
  prefix = "bert." if "bert.pooler.dense.weight" in base else ""
  np.testing.assert_array_equal(grafted["bert.pooler.dense.weight"],
                                base[prefix + "pooler.dense.weight"])
  model, report = hf.load_pretrained(str(mlm), "sequence_classification", 2)
  assert not any("pooler" in k for k in report.missing)
  # transformers' BertForMaskedLM has no pooler and ignores it on load.
  transformers = pytest.importorskip("transformers")
  _, info = transformers.BertForMaskedLM.from_pretrained(
      str(mlm), output_loading_info=True)
  assert info["missing_keys"] == set() or not info["missing_keys"]
  # A base of another width (a model from scratch): nothing copied.
  wide = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=1,
                    num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=128)
  other = hf.export(create_model("masked_lm", wide, seed=1), tmp_path / "w",
                    "masked_lm")
  assert keep_base_pooler(other, tiny_model_dir) == []


_WORDS = ("the cat sat on the mat and the dog ran in the park while a bird "
          "sang over the river near the old town").split()


def _synthetic_texts(tmp_path):
  """(train, valid) text files of random sentences over a small vocabulary."""
  rng = np.random.default_rng(0)
  paths = []
  for name, lines in (("train.txt", 200), ("valid.txt", 40)):
    path = tmp_path / name
    path.write_text("\n".join(" ".join(rng.choice(_WORDS, 24))
                              for _ in range(lines)) + "\n")
    paths.append(str(path))
  return paths


def test_lora_on_a_model_from_scratch_trains_its_low_rank_updates(tmp_path):
  """Every method seam applies on the from-scratch path too (LoRA's dense
  factory): the encoder's kernels stay frozen, the updates and head train."""
  config = _config(_synthetic_texts(tmp_path), total_steps=12)
  config.data.cache_dir = str(tmp_path / "cache")
  config.methods = ("lora",)
  config.method_options = {"lora": {"r": 4}}
  run = train.build(config)
  trained = [p for p, _ in nnx.to_flat_state(run.state["params"])]
  frozen = [p for p, _ in nnx.to_flat_state(run.frozen.params)]
  assert any("lora_a" in p for p in trained)
  assert all("lora" in p or p[0] != "bert" for p in trained), trained
  assert any(p[-1] == "kernel" and "query" in p for p in frozen)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = _losses(tmp_path / "run")
  # The random encoder and tied embeddings stay frozen, so the loss falls
  # slowly from ln(vocab) = 10.3 (measured: 10.32 -> 9.92 in 12 steps).
  assert losses[12] < losses[1] - 0.25, losses
  assert summary["params/trainable"] < 0.5 * summary["params/total"]


@pytest.mark.parametrize("method,options", [
    ("augment", {"ops": ("swap",)}), ("dp_sgd", {"noise_multiplier": 1.0})])
def test_a_method_that_changes_the_data_refuses_a_corpus(tmp_path, method,
                                                         options):
  config = _config(_synthetic_texts(tmp_path))
  config.methods = (method,)
  config.method_options = {method: options}
  with pytest.raises(ConfigError, match=f"config.methods has '{method}', "
                     r"which changes the training data .*config.task="
                     "'masked_lm' streams its own input"):
    validate(config)


@pytest.mark.parametrize("masking", ["token", "span"])
def test_sparse_prediction_loss_and_gradients_equal_dense(texts, masking):
  """One masked batch: the loss over the gathered masked positions equals
  the loss over every position (within 1e-5), and so do the gradients and
  the evaluation outputs."""
  from research.training import partition  # pylint: disable=import-outside-toplevel
  config = _config(texts)
  config.task_options.masking = masking
  tokenizer = data.load_tokenizer(str(hf.resolve("all-minilm-l6-v2")))
  task = tasks.load(config, tokenizer)
  cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, pre_layer_norm=True, use_bias=False,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  graphdef, params, frozen, rest = partition.split_model(
      create_model("masked_lm", cfg, seed=0))
  rows = [l for l in pathlib.Path(texts[1]).read_text().splitlines()][:16]
  enc = tokenizer(rows, padding="max_length", truncation=True, max_length=64,
                  return_tensors="np")
  batch = {"input_ids": jnp.asarray(enc["input_ids"], jnp.int32),
           "attention_mask": jnp.asarray(enc["attention_mask"], jnp.int32),
           "token_type_ids": jnp.zeros((16, 64), jnp.int32),
           "weights": jnp.ones(16, jnp.float32)}
  masked = task.transform(batch, jax.random.key(4))
  assert masked["masked_positions"].shape == (16, 20)  # ceil(2 x .15 x 64)
  dense = {k: v for k, v in masked.items() if k != "masked_positions"}
  grad = jax.jit(jax.value_and_grad(task.loss_fn(graphdef), has_aux=True))
  (sparse_loss, sparse_aux), sparse_grads = grad(params, (frozen, rest),
                                                 masked, jax.random.key(0))
  (dense_loss, dense_aux), dense_grads = grad(params, (frozen, rest), dense,
                                              jax.random.key(0))
  assert float(dense_aux["weight"]) == float(sparse_aux["weight"]) > 50
  assert abs(float(sparse_loss) - float(dense_loss)) < 1e-5
  assert float(dense_loss) == pytest.approx(np.log(len(tokenizer)), abs=0.5)
  for a, b in zip(jax.tree.leaves(sparse_grads), jax.tree.leaves(dense_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  forward = task.eval_forward(graphdef)
  sparse_out = forward(params, (frozen, rest), masked)
  dense_out = forward(params, (frozen, rest), dense)
  assert abs(float(sparse_out["loss"]) - float(dense_out["loss"])) < 1e-4
  chosen = np.asarray(masked["labels"]) != -100
  np.testing.assert_array_equal(np.asarray(sparse_out["weights"]) > 0, chosen)
  np.testing.assert_array_equal(np.asarray(sparse_out["predictions"])[chosen],
                                np.asarray(dense_out["predictions"])[chosen])


def _launch_commands(doc):
  """The `./launch.sh ...` commands of a docstring, continuations joined."""
  commands, current = [], None
  for line in doc.splitlines():
    line = line.strip()
    if current is not None:
      current += " " + line.rstrip("\\").strip()
      if not line.endswith("\\"):
        commands.append(current)
        current = None
    elif line.startswith("./launch.sh"):
      current = line.rstrip("\\").strip()
      if not line.endswith("\\"):
        commands.append(current)
        current = None
  return commands


def test_pod_recipe_launch_commands_pass_dry_run(tmp_path):
  """The docstring's launch.sh commands run as written with --dry-run: each
  reaches the workers' research.train command with its config, which
  validates."""
  import shlex  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  commands = _launch_commands(pretrain_bert_base.__doc__)
  assert len(commands) == 2
  for command in commands:
    argv = shlex.split(command)
    config = argv[argv.index("tpu") + 5]  # tpu --name N --zone Z CONFIG
    assert config.startswith("experiments/pretrain_bert_base.py:")
    validate(pretrain_bert_base.get_config(config.partition(":")[2]))
    out = subprocess.run(["bash", str(REPO / "launch.sh"), *argv[1:],
                          "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin",
                                         "HOME": str(tmp_path)}, check=False)
    assert out.returncode == 0, out.stderr
    worker = next(l for l in out.stdout.splitlines()
                  if l.startswith("# on every worker: "))
    # What each worker's shell runs, argument by argument.
    tail = worker.split("; . ~/.research-env; ")[1]
    remote = subprocess.run(["bash", "-c", f"printf '%s\\n' {tail}"],
                            capture_output=True, text=True, check=True,
                            env={"HOME": "/home/w"}).stdout.splitlines()
    assert remote[1:] == ["-m", "research.train", "--config", config,
                          "--workdir", argv[argv.index("--workdir") + 1]]
    assert "+ gcloud compute tpus tpu-vm ssh my-v4-32 --zone us-central2-b" \
        in out.stdout
