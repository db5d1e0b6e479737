"""Training-text augmentation (the augment method) and typo noise, research/data/augment.py.

MiniLM's WordPiece tokenizer; the contextual operation with a small
masked-LM built here (the packaged MiniLM has none, and is refused). Each
epoch trains on new copies, a function of (seed, epoch); "once" keeps one
set. A run with augmentation and FreeLB killed with SIGKILL in its second
epoch resumes to the parameters of a straight run.
"""

import collections
import logging
import signal
import subprocess

import numpy as np
import pytest

from research import data, train
from research.configs import ConfigError
from research.data import augment, tokenize
from research.data.splits import TokenizedSplit
from research.models import BertConfig, create_model, hf
from research.methods.adversarial import embeddings as adversarial
from tests import test_reliability as rel
from tests.test_train import _tiny_config

SPECIAL = {0, 101, 102, 103}
TEXTS = (["the movie was surprisingly good and the actors were wonderful",
          "an unwatchable mess", "i loved it"],
         ["critics disagreed", "nobody cared about the plot at all", "yes"])


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return data.load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="module")
def words(tokenizer):
  return augment.Words(tokenizer, adversarial.special_ids(tokenizer))


def _split(tokenizer, texts=TEXTS, max_length=32):
  ids, types, offsets = tokenize.encode(tokenizer, list(texts), max_length)
  n = len(offsets) - 1
  return TokenizedSplit.sequence(
      name="train", where="test", input_ids=ids, token_type_ids=types,
      offsets=offsets, labels=np.arange(n, dtype=np.int32) % 2,
      rows=np.arange(n, dtype=np.int32), max_length=max_length,
      has_labels=True)


def _examples(split):
  return [(split.input_ids[a:b], split.token_type_ids[a:b])
          for a, b in zip(split.offsets[:-1], split.offsets[1:])]


def _texts(ids, types):
  """(special tokens with their positions, the token lists of each text)."""
  special = [(i, t) for i, t in enumerate(ids.tolist()) if t in SPECIAL]
  texts = collections.defaultdict(list)
  for tok, typ in zip(ids.tolist(), types.tolist()):
    if tok not in SPECIAL:
      texts[typ].append(tok)
  return special, texts


def test_words_split_and_join_give_the_example_back(tokenizer, words):
  for ids, types in _examples(_split(tokenizer)):
    back_ids, back_types = augment.Words.join(words.split(ids, types))
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_types, types)
  ids = np.asarray(tokenizer("unwatchable mess")["input_ids"], np.int32)
  items = words.split(ids, np.zeros_like(ids))
  # [CLS], one text of two words (the first of several pieces), [SEP].
  assert [type(i) for i, _ in items] == [int, list, int]
  assert len(items[1][0]) == 2 and len(items[1][0][0]) > 1
  assert words.text(items[1][0][0]) == "unwatchable"


@pytest.mark.parametrize("op", ["swap", "delete", "insert"])
def test_eda_operations_edit_each_text_and_keep_special_tokens(
    op, tokenizer, words):
  split = _split(tokenizer)
  out = augment.augment(split, words, ops=(op,), copies=2, rate=0.3, seed=0)
  assert len(out) == 3 * len(split)
  np.testing.assert_array_equal(out.labels, np.tile(split.labels, 3))
  np.testing.assert_array_equal(out.rows, np.tile(split.rows, 3))
  originals = _examples(split)
  changed = 0
  for j, (ids, types) in enumerate(_examples(out)):
    orig_ids, orig_types = originals[j % len(split)]
    if j < len(split):
      np.testing.assert_array_equal(ids, orig_ids)
      continue
    assert len(ids) <= split.max_length
    special, texts = _texts(ids, types)
    orig_special, orig_texts = _texts(orig_ids, orig_types)
    assert [t for _, t in special] == [t for _, t in orig_special]
    assert ids[0] == 101 and ids[-1] == 102
    for typ, toks in texts.items():
      before = orig_texts[typ]
      if op == "swap":
        assert sorted(toks) == sorted(before)
      elif op == "delete":
        assert 0 < len(toks) <= len(before)
        assert not collections.Counter(toks) - collections.Counter(before)
      else:
        assert len(toks) >= len(before)
        assert set(toks) == set(before)
      changed += toks != before
  assert changed >= 6  # most texts of the 2 x 3 copies change


def test_augmentation_is_a_function_of_the_seed(tokenizer, words):
  split = _split(tokenizer)
  kw = dict(ops=("swap", "delete", "insert"), copies=3, rate=0.3)
  a = augment.augment(split, words, seed=1, **kw)
  b = augment.augment(split, words, seed=1, **kw)
  c = augment.augment(split, words, seed=2, **kw)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.offsets, b.offsets)
  np.testing.assert_array_equal(a.token_type_ids, b.token_type_ids)
  assert not (len(a.input_ids) == len(c.input_ids)
              and (a.input_ids == c.input_ids).all())


def test_each_epoch_draws_its_copies_from_seed_and_epoch(tokenizer, words):
  split = _split(tokenizer)
  kw = dict(ops=("swap", "delete", "insert"), copies=2, rate=0.3)
  n = len(split)

  def copies(out):
    return [tuple(ids) for ids, _ in _examples(out)[n:]]

  e1 = augment.augment(split, words, seed=1, epoch=1, **kw)
  assert copies(e1) == copies(augment.augment(split, words, seed=1, epoch=1,
                                              **kw))
  assert _examples(e1)[0][0].tolist() == _examples(split)[0][0].tolist()
  for other in (dict(seed=1, epoch=0), dict(seed=2, epoch=1),
                dict(seed=1, epoch=None)):
    again = copies(augment.augment(split, words, **other, **kw))
    assert sum(a != b for a, b in zip(again, copies(e1))) >= 3, other


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory, minilm_dir):
  """A 2-layer random BERT with its masked-LM head, MiniLM's vocabulary."""
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=128)
  out = tmp_path_factory.mktemp("tiny_mlm")
  hf.export(create_model("masked_lm", cfg, 0, seed=0), out, "masked_lm",
            tokenizer_dir=minilm_dir)
  return out


def test_contextual_replaces_single_token_words_by_mlm_predictions(
    tokenizer, words, tiny_mlm_dir):
  split = _split(tokenizer)
  mlm = augment.MaskedLM(str(tiny_mlm_dir), words, batch_size=4)
  kw = dict(ops=("contextual",), copies=2, rate=0.5, seed=0, mlm=mlm)
  out = augment.augment(split, words, **kw)
  again = augment.augment(split, words, **kw)
  np.testing.assert_array_equal(out.input_ids, again.input_ids)
  originals = _examples(split)
  for j, (ids, types) in enumerate(_examples(out)):
    orig, orig_types = originals[j % len(split)]
    np.testing.assert_array_equal(types, orig_types)
    assert len(ids) == len(orig)  # replaced in place
    diff = np.flatnonzero(ids != orig)
    if j < len(split):
      assert not len(diff)
      continue
    single = [k for k in range(len(orig)) if orig[k] not in SPECIAL
              and not words.continues[orig[k]]
              and (k + 1 == len(orig) or not words.continues[orig[k + 1]])]
    assert 1 <= len(diff) and set(diff) <= set(single)
    assert len(diff) == max(1, round(0.5 * len(single)))
    for k in diff:  # whole words, never special tokens or pieces
      assert ids[k] not in SPECIAL and not words.continues[ids[k]]


def test_a_checkpoint_without_mlm_head_is_refused(words, minilm_dir):
  with pytest.raises(ConfigError, match="no masked-LM head"):
    augment.MaskedLM(str(minilm_dir), words)


def test_typos_are_deterministic_and_change_words(tokenizer, words):
  split = _split(tokenizer)
  a = augment.typos(split, words, rate=0.5, seed=3)
  b = augment.typos(split, words, rate=0.5, seed=3)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  assert len(a) == len(split)
  np.testing.assert_array_equal(a.labels, split.labels)
  texts = [tokenizer.decode(ids, skip_special_tokens=True)
           for ids, _ in _examples(a)]
  before = [tokenizer.decode(ids, skip_special_tokens=True)
            for ids, _ in _examples(split)]
  moved = [sum(x != y for x, y in zip(t.split(), o.split()))
           for t, o in zip(texts, before)]
  assert sum(moved) >= 4 and all(len(t.split()) == len(o.split())
                                 for t, o in zip(texts, before))
  same = augment.typos(split, words, rate=1e-9, seed=3)
  np.testing.assert_array_equal(same.input_ids, split.input_ids)


def _augmented(model_dir, methods=(), overrides=None, **options):
  """A tiny run with the augment method (`options`) before `methods`."""
  config = _tiny_config(model_dir, **(overrides or {}))
  config.methods = ("augment",) + tuple(methods)
  config.method_options = {"augment": options}
  return config


def test_config_errors_name_the_field(tiny_model_dir):
  config = _augmented(tiny_model_dir, ops=("synonym",))
  with pytest.raises(ConfigError, match=r"config.method_options.augment.ops "
                     r"has 'synonym'; valid: swap, delete"):
    train.build(config)
  config = _augmented(tiny_model_dir, ops=("contextual",))
  with pytest.raises(ConfigError,
                     match="config.method_options.augment.mlm_model"):
    train.build(config)
  config = _augmented(tiny_model_dir, ops=("swap",), regenerate="twice")
  with pytest.raises(ConfigError,
                     match=r"augment.regenerate='twice'; valid: epoch .*once"):
    train.build(config)


def test_build_grows_the_training_set_and_logs_examples(tiny_model_dir,
                                                        caplog):
  config = _augmented(tiny_model_dir, ops=("swap", "delete"), copies=2,
                      log_examples=1)
  with caplog.at_level(logging.INFO, logger="research.data.augment"):
    run = train.build(config)
  assert len(run.train_split) == 3 * 320
  assert "320 training examples -> 960" in caplog.text
  assert "epoch 0's copies" in caplog.text
  assert "copy 2 of 0:" in caplog.text


def _epoch_examples(batcher, epoch):
  """The token sequences an epoch trains on, as a multiset."""
  seen = collections.Counter()
  steps = batcher.steps_per_epoch
  for step in range(epoch * steps, (epoch + 1) * steps):
    batch = batcher.batch_at(step)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
      seen[tuple(ids[mask > 0])] += 1
  return seen


def test_each_epoch_trains_on_new_copies_and_a_rebuild_on_the_same(
    tiny_model_dir, caplog):
  """320 sentences + 1 copy each, batch 16: 40 steps an epoch, nothing
  dropped; the originals in every epoch, the copies new in epoch 1."""
  options = {"ops": ("swap", "delete", "insert"), "copies": 1, "rate": 0.3}
  run = train.build(_augmented(tiny_model_dir, **options))
  originals = collections.Counter(
      tuple(ids) for ids, _ in _examples(run.train_split)[:320])
  first, second = (_epoch_examples(run.train_batches, e) for e in (0, 1))
  assert sum(first.values()) == sum(second.values()) == 640
  assert not originals - first and not originals - second
  new = sum(((second - originals) - (first - originals)).values())
  assert new >= 300, new  # of 320 copies (320 when measured)
  # A fresh build asked for epoch 1 first (as a run resumed there is)
  # gives its batches again: the copies are a function of (seed, epoch).
  with caplog.at_level(logging.INFO, logger="research.data.augment"):
    rebuilt = train.build(_augmented(tiny_model_dir, **options))
    steps = range(40, 80, 7)
    for step in steps:
      a, b = run.train_batches.batch_at(step), rebuilt.train_batches.batch_at(
          step)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  assert "epoch 1's copies" in caplog.text
  # "once" (Wei & Zou's EDA): the same set every epoch.
  once = train.build(_augmented(tiny_model_dir, **options,
                                regenerate="once"))
  assert type(once.train_batches) is data.Batcher  # pylint: disable=unidiomatic-typecheck
  assert (_epoch_examples(once.train_batches, 0)
          == _epoch_examples(once.train_batches, 1))


# --- resume -------------------------------------------------------------------

# 640 examples in batches of 32: 20 steps an epoch, 3 epochs.
RESUME = {"methods": "('augment','freelb')", "batch_size": 32,
          "method_options": "{'augment': {'ops': ('swap','delete','insert'), "
                            "'copies': 1}}"}


@pytest.mark.slow
def test_killed_run_with_augmentation_and_freelb_resumes_exactly(
    tmp_path, tiny_model_dir, compilation_cache):
  straight = tmp_path / "straight"
  config = _augmented(tiny_model_dir, ("freelb",), {
      **rel.BASE, "batch_size": 32}, ops=("swap", "delete", "insert"),
      copies=1)
  train.train_and_evaluate(config, str(straight))
  workdir, log_path = tmp_path / "run", tmp_path / "killed.log"
  args = rel._cli(tiny_model_dir, workdir, **RESUME)  # pylint: disable=protected-access
  # Killed in epoch 1 (steps 21-40): the rerun remakes that epoch's copies
  # without having trained on it, then epoch 2's.
  proc = rel._kill_after_checkpoint(args, compilation_cache, workdir, log_path, 30)  # pylint: disable=protected-access
  assert proc.returncode == -signal.SIGKILL
  resume_from = rel._steps_on_disk(workdir)[-1]  # pylint: disable=protected-access
  assert 30 <= resume_from < 60
  out = subprocess.run(args, cwd=rel.REPO, env=rel._env(compilation_cache),  # pylint: disable=protected-access
                       capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {resume_from}" in out.stderr
  assert "training examples -> 640" in out.stderr
  assert f"epoch {resume_from // 20}'s copies" in out.stderr
  assert "epoch 2's copies" in out.stderr
  rel._assert_same_as(workdir, straight)  # pylint: disable=protected-access
