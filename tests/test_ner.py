"""Tests of research/metrics/ner.py against seqeval and a conlleval oracle.

`conlleval_entities` below is an independent transcription of the chunk
rules of the CoNLL shared task's conlleval script (startOfChunk /
endOfChunk), used only as a test oracle for seqeval's default mode.
"""

import random

import pytest
from seqeval import metrics
from seqeval import scheme

from research.data import conll
from research.metrics import ner
from tests.conftest import shared_data



def _split(tag):
  if tag == "O":
    return "O", ""
  prefix, _, kind = tag.partition("-")
  return prefix, kind


def _ends(prev, tag, prev_type, kind):
  return (prev in ("E", "S") or
          (prev in ("B", "I") and tag in ("B", "S", "O")) or
          (prev != "O" and prev_type != kind))


def _starts(prev, tag, prev_type, kind):
  return (tag in ("B", "S") or
          (prev in ("E", "S", "O") and tag in ("E", "I")) or
          (tag != "O" and prev_type != kind))


def conlleval_entities(sentences):
  """{(sentence, type, first, last)} by conlleval's rules; every sentence
  ends with an implicit O (conlleval's blank line)."""
  out = set()
  for i, tags in enumerate(sentences):
    prev, prev_type, start = "O", "", None
    for j, tag in enumerate(list(tags) + ["O"]):
      cur, kind = _split(tag)
      if start is not None and _ends(prev, cur, prev_type, kind):
        out.add((i, prev_type, start, j - 1))
        start = None
      if _starts(prev, cur, prev_type, kind):
        start = j
      prev, prev_type = cur, kind
  return out


def strict_entities(sentences):
  """{(sentence, type, first, last)}: B-X followed by I-X* only."""
  out = set()
  for i, tags in enumerate(sentences):
    j = 0
    while j < len(tags):
      if tags[j].startswith("B-"):
        kind, k = tags[j][2:], j + 1
        while k < len(tags) and tags[k] == "I-" + kind:
          k += 1
        out.add((i, kind, j, k - 1))
        j = k
      else:
        j += 1
  return out


def oracle_scores(gold, predicted, find):
  g, p = find(gold), find(predicted)
  right = len(g & p)
  precision = right / len(p) if p else 0.0
  recall = right / len(g) if g else 0.0
  f1 = 2 * precision * recall / (precision + recall) if right else 0.0
  return precision, recall, f1


EDGE_CASES = [
    # (tags, conlleval entities, strict IOB2 entities) as (type, first, last)
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)], []),         # I- after O
    (["I-PER", "O"], [("PER", 0, 0)], []),                       # I- first
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)],
     [("PER", 0, 0)]),                                            # type change
    (["B-PER", "B-LOC"], [("PER", 0, 0), ("LOC", 1, 1)],
     [("PER", 0, 0), ("LOC", 1, 1)]),
    (["O", "B-ORG", "I-ORG"], [("ORG", 1, 2)], [("ORG", 1, 2)]),  # at the end
    (["B-MISC"], [("MISC", 0, 0)], [("MISC", 0, 0)]),
    (["I-PER", "I-PER", "B-PER", "I-PER"],                       # IOB1
     [("PER", 0, 1), ("PER", 2, 3)], [("PER", 2, 3)]),
    (["B-LOC", "B-LOC", "I-LOC"], [("LOC", 0, 0), ("LOC", 1, 2)],
     [("LOC", 0, 0), ("LOC", 1, 2)]),
    (["B-PER", "I-PER", "O", "I-PER"], [("PER", 0, 1), ("PER", 3, 3)],
     [("PER", 0, 1)]),
    (["O", "O"], [], []),
]


@pytest.mark.parametrize("tags,conlleval,strict", EDGE_CASES)
def test_entities_edge_cases(tags, conlleval, strict):
  assert ner.entities(tags) == conlleval
  assert ner.entities(tags, mode="strict") == strict
  assert conlleval_entities([tags]) == {(0, *e) for e in conlleval}
  assert strict_entities([tags]) == {(0, *e) for e in strict}


def test_sentence_boundary_ends_an_entity():
  gold = [["B-PER", "I-PER"], ["I-PER", "O"]]
  # conlleval: PER(s0, 0-1) and a new PER at the start of s1; never joined.
  assert conlleval_entities(gold) == {(0, "PER", 0, 1), (1, "PER", 0, 0)}
  pred = [["B-PER", "I-PER"], ["O", "O"]]
  # 1 of 2 gold found, 1 of 1 predicted right: P 1, R 0.5, F1 2/3.
  scores = ner.entity_scores(gold, pred)
  assert (scores["precision"], scores["recall"]) == (1.0, 0.5)
  assert scores["f1"] == pytest.approx(2 / 3)
  # Strict: the I-PER opening s1 is no entity: P = R = 1.
  assert ner.entity_scores(gold, pred, mode="strict")["f1"] == 1.0


def test_hand_counted_scores_both_modes():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-ORG", "O", "I-MISC"]]
  # conlleval: gold PER(0-1), LOC(3), ORG(0-1); predicted PER(0-1), LOC(3)
  # (I- after O starts one), ORG(0) (too short), MISC(2). Right: PER, LOC.
  # P = 2/4, R = 2/3, F1 = 2 * (1/2)(2/3) / (7/6) = 4/7.
  scores = ner.entity_scores(gold, pred)
  assert scores["precision"] == pytest.approx(0.5)
  assert scores["recall"] == pytest.approx(2 / 3)
  assert scores["f1"] == pytest.approx(4 / 7)
  assert (scores["num_gold"], scores["num_predicted"]) == (3, 4)
  # Tokens right: s0 B-PER I-PER O (3 of 4), s1 B-ORG (1 of 3): 4 / 7.
  assert scores["accuracy"] == pytest.approx(4 / 7)
  assert scores["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0,
                                       "f1": 1.0, "support": 1}
  assert scores["per_type"]["MISC"]["precision"] == 0.0
  # Strict: predicted PER(0-1), ORG(0); the two I- openers are dropped.
  # Right: PER. P = 1/2, R = 1/3, F1 = (1/3) / (5/6) = 2/5.
  strict = ner.entity_scores(gold, pred, mode="strict")
  assert strict["precision"] == pytest.approx(0.5)
  assert strict["recall"] == pytest.approx(1 / 3)
  assert strict["f1"] == pytest.approx(0.4)
  assert strict["num_predicted"] == 2


def _random_tags(rng, n, types=("PER", "LOC", "ORG")):
  return [rng.choice(["O", "O", "O"] + [f"{p}-{t}" for t in types
                                        for p in "BI"]) for _ in range(n)]


def test_seqeval_matches_the_oracles_on_random_sequences():
  rng = random.Random(0)
  gold = [_random_tags(rng, rng.randint(1, 12)) for _ in range(2000)]
  pred = [_random_tags(rng, len(g)) for g in gold]
  for sentences in (gold, pred):
    seq = {(i, *e) for i, s in enumerate(sentences) for e in ner.entities(s)}
    assert seq == conlleval_entities(sentences)
    seq = {(i, *e) for i, s in enumerate(sentences)
           for e in ner.entities(s, mode="strict")}
    assert seq == strict_entities(sentences)
  for mode, find in (("conlleval", conlleval_entities),
                     ("strict", strict_entities)):
    scores = ner.entity_scores(gold, pred, mode=mode)
    want = oracle_scores(gold, pred, find)
    assert (scores["precision"], scores["recall"], scores["f1"]) == \
        pytest.approx(want)
  # And the module is seqeval itself, called as documented.
  assert ner.entity_scores(gold, pred)["f1"] == pytest.approx(
      metrics.f1_score(gold, pred, mode=None))
  assert ner.entity_scores(gold, pred, mode="strict")["f1"] == pytest.approx(
      metrics.f1_score(gold, pred, mode="strict", scheme=scheme.IOB2))


def test_conll2003_valid_gold_and_corrupted():
  split = conll.read_conll(str(shared_data("conll2003", "valid.txt")))
  gold = split.tags
  perfect = ner.entity_scores(gold, gold)
  assert perfect["num_gold"] == 5942 and perfect["f1"] == 1.0
  assert {t: r["support"] for t, r in perfect["per_type"].items()} == {
      "LOC": 1837, "MISC": 922, "ORG": 1341, "PER": 1842}
  # Corrupt 5% of the tags at random, IOB1-style I- openers included.
  rng = random.Random(1)
  tags = conll.CONLL2003_TAGS
  pred = [[rng.choice(tags) if rng.random() < 0.05 else t for t in s]
          for s in gold]
  for mode, find in (("conlleval", conlleval_entities),
                     ("strict", strict_entities)):
    scores = ner.entity_scores(gold, pred, mode=mode)
    assert (scores["precision"], scores["recall"], scores["f1"]) == \
        pytest.approx(oracle_scores(gold, pred, find))
    assert 0.6 < scores["f1"] < 0.95
  # IOB1 gold reads the same as IOB2 under conlleval rules.
  iob1 = [[("I-" + t[2:] if t.startswith("B-") and
            (j == 0 or s[j - 1][2:] != t[2:]) else t)
           for j, t in enumerate(s)] for s in gold]
  assert iob1 != gold
  assert ner.entity_scores(iob1, gold)["f1"] == 1.0
  assert ner.entity_scores(iob1, gold, mode="strict")["f1"] < 0.1


def test_bad_input():
  with pytest.raises(ValueError, match="mode must be one of"):
    ner.entity_scores([["O"]], [["O"]], mode="iob1")
  with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 "
                     "predicted"):
    ner.entity_scores([["O"], ["O", "O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
    ner.entity_scores([["O"], ["O"]], [["O"]])
