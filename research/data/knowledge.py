r"""Knowledge lists for ERNIE-style masking: names found in the token ids.

ERNIE 1.0 (Sun et al. 2019) masks whole entities and phrases, so that the
model must recall a name from its context rather than from the name's other
half. Here the names come from a knowledge list: a UTF-8 text file, one name
per line (entity names, a domain glossary, a knowledge graph's labels;
blank lines and lines starting with "#" are skipped). `KnowledgeTable`
tokenises each name once, on the host, and the masking transform
(`research.data.masking`, mode "knowledge") finds them in every batch's
token ids inside the jitted step:

  * on word boundaries: a match starts at a word's first token and the token
    after it starts a word (or is special), so "York" is found in "New
    York", never in "Yorkshire";
  * longest first: at each position the longest name wins; names that
    overlap ("New York" and "York City" in "New York City") join into one
    unit;
  * case-insensitively if asked (`ignore_case`): each name is also looked
    up lower-cased, upper-cased and title-cased (an uncased tokenizer, such
    as MiniLM's, always matches case-insensitively: it lower-cases the text).

Matching on device keeps masking a pure function of (seed, step) and the
batch (exact resume, no extra data field): a window of n tokens is hashed
(a polynomial hash of the ids and n), looked up in the sorted hashes of the
names, and checked token by token, so a hash collision never makes a false
match. Names longer than `max_tokens` are skipped and counted.

Making a list (`python -m research.data.knowledge`):

    # CoNLL-2003's gold entity strings
    python -m research.data.knowledge --conll ../shared/data/conll2003/train.txt \
        --out /tmp/conll_entities.txt
    # Proper-noun phrases of a table's text columns (no model needed)
    python -m research.data.knowledge --table ../shared/data/glue_rte/train.tsv \
        --columns sentence1,sentence2 --out /tmp/rte_names.txt
    # spaCy's named entities and noun chunks, where spaCy and the model are
    # installed (pip install spacy; python -m spacy download en_core_web_sm)
    python -m research.data.knowledge --text my.txt \
        --extractor spacy:en_core_web_sm --out /tmp/names.txt

The "capitalised" extractor (the default for text) takes maximal runs of
capitalised words (joined by "of", "the", "de", "and", "for" inside a run;
leading function words such as "The" cut off), dropping a single
capitalised word that starts a sentence unless it is capitalised elsewhere
too: a rough proper-noun-phrase finder, documented as
such, for when no spaCy model is available.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import logging
import os
import re
import sys

import jax.numpy as jnp
import numpy as np

from research.data.errors import DataError

log = logging.getLogger(__name__)

MAX_TOKENS = 16          # longest name matched, in tokens
_MOD = 1 << 32           # the hash is uint32 arithmetic
_BASE = 1_000_003        # polynomial hash base
_LENGTH = 2_654_435_761  # the length enters the hash: n * _LENGTH


def read_names(path) -> list[str]:
  """The names of a knowledge list file, in file order, without repeats.

  Raises:
    DataError: a missing file, a line that is not UTF-8, or no names,
      naming the file (and line).
  """
  if not os.path.isfile(path):
    raise DataError(f"knowledge list {path}: no such file (one name per "
                    "line, UTF-8)")
  names, seen = [], set()
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").strip()
      except UnicodeDecodeError:
        raise DataError(f"knowledge list {path}, line {number}: not valid "
                        "UTF-8 (one name per line, UTF-8 text)") from None
      if line and not line.startswith("#") and line not in seen:
        seen.add(line)
        names.append(line)
  if not names:
    raise DataError(f"knowledge list {path}: no names (one per line; "
                    "blank lines and '#' comments are skipped)")
  return names


def _hash(ids) -> int:
  """The hash of one token sequence (the device computes the same)."""
  h = len(ids) * _LENGTH
  for k, i in enumerate(ids):
    h += int(i) * pow(_BASE, k, _MOD)
  return h % _MOD


@dataclasses.dataclass(frozen=True, eq=False)
class KnowledgeTable:
  """Tokenised names, sorted by hash; `unit_starts` finds them (jittable).

  Attributes:
    hashes: uint32 [E], sorted.
    tokens: int32 [E, max_tokens], each name's ids (-1 after its end).
    lengths: int32 [E].
    max_tokens: the longest name, in tokens.
    stats: what `build` kept and skipped (logged).
  """
  hashes: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray
  max_tokens: int
  stats: dict

  @classmethod
  def build(cls, names, tokenizer, *, ignore_case=False,
            max_tokens=MAX_TOKENS) -> "KnowledgeTable":
    """Tokenises `names` (with case variants if `ignore_case`)."""
    variants = []
    for name in names:
      forms = [name]
      if ignore_case:
        forms += [name.lower(), name.upper(), name.title()]
      # " name": byte-level BPE marks a word start by a leading space.
      variants += forms + [" " + f for f in forms]
    special = set(tokenizer.all_special_ids)
    encoded = tokenizer(variants, add_special_tokens=False)["input_ids"]
    stats = collections.Counter(names=len(names))
    by_hash = {}
    for ids in dict.fromkeys(map(tuple, encoded)):  # distinct, in order
      if not ids or special.intersection(ids):
        stats["skipped: no tokens or a special token"] += 1
        continue
      if len(ids) > max_tokens:
        stats[f"skipped: longer than {max_tokens} tokens"] += 1
        continue
      h = _hash(ids)
      if h in by_hash:  # two names, one hash: the first stays findable
        stats["skipped: hash shared with another name"] += 1
        continue
      by_hash[h] = ids
    if not by_hash:
      raise DataError(f"knowledge list: none of the {len(names)} names has "
                      f"1 to {max_tokens} tokens")
    order = sorted(by_hash)
    longest = max(len(ids) for ids in by_hash.values())
    tokens = np.full((len(order), longest), -1, np.int32)
    for row, h in enumerate(order):
      tokens[row, :len(by_hash[h])] = by_hash[h]
    stats["token sequences"] = len(order)
    return cls(np.asarray(order, np.uint32), tokens,
               np.asarray([len(by_hash[h]) for h in order], np.int32),
               longest, dict(stats))

  def match_lengths(self, input_ids, unit_starts):
    """int32 [..., L]: the longest name starting at each token (0: none).

    Args:
      input_ids: int [..., L].
      unit_starts: bool [..., L]: word starts, special tokens and the token
        after one (`masking.unit_starts`); a match must start at one and end
        before one (or at the row's end).
    """
    length = input_ids.shape[-1]
    hashes, tokens = jnp.asarray(self.hashes), jnp.asarray(self.tokens)
    lengths = jnp.asarray(self.lengths)
    ids = input_ids.astype(jnp.int32)
    pad = jnp.full(ids.shape[:-1] + (self.max_tokens,), -1, jnp.int32)
    padded = jnp.concatenate([ids, pad], axis=-1)
    # window[..., t, k] = ids[t + k] (-1 past the row).
    window = jnp.stack([padded[..., k:k + length]
                        for k in range(self.max_tokens)], axis=-1)
    ends = jnp.concatenate([unit_starts, jnp.ones_like(unit_starts[..., :1])],
                           axis=-1)  # a match may end at the row's end
    position = jnp.arange(length)
    running = jnp.zeros(ids.shape, jnp.uint32)
    best = jnp.zeros(ids.shape, jnp.int32)
    for n in range(1, self.max_tokens + 1):
      running = running + window[..., n - 1].astype(jnp.uint32) * jnp.uint32(
          pow(_BASE, n - 1, _MOD))
      h = running + jnp.uint32(n * _LENGTH % _MOD)
      row = jnp.clip(jnp.searchsorted(hashes, h), 0, len(self.hashes) - 1)
      same = (hashes[row] == h) & (lengths[row] == n) & jnp.all(
          (tokens[row] == window[..., :self.max_tokens]) |
          (jnp.arange(self.max_tokens) >= n), axis=-1)
      fits = (position + n <= length) & jnp.take_along_axis(
          ends, jnp.minimum(position + n, length) * jnp.ones_like(ids),
          axis=-1)
      best = jnp.where(same & fits & unit_starts, n, best)
    return best

  def unit_starts(self, input_ids, word_starts, special_mask):
    """bool [..., L]: starts of the masking units, every name found one unit.

    Args:
      input_ids: int [..., L].
      word_starts: bool [..., L]: the tokenizer's word starts
        (`masking.word_start_table(tokenizer)[input_ids]`).
      special_mask: bool [..., L]: special tokens and padding.
    """
    from research.data import masking  # pylint: disable=import-outside-toplevel
    starts = masking.unit_starts(word_starts, special_mask)
    found = self.match_lengths(input_ids, starts)
    inside = jnp.zeros(starts.shape, bool)
    for j in range(1, self.max_tokens):  # tokens after a match's first
      inside = inside | (masking._shift(found, j, 0) > j)  # pylint: disable=protected-access
    return starts & ~inside


# --- Making a list -------------------------------------------------------------

CONNECTORS = ("of", "the", "de", "and", "for")
# Capitalised only because they start a sentence: cut from a run's start.
LEADING = frozenset(
    "the a an in on at for of and but or this that these those it its he she "
    "they we i you as by with from after before when while if to".split())
_WORD = re.compile(r"[\w][\w'.&-]*", re.UNICODE)


def _capitalised(word):
  return word[:1].isupper()


def capitalised_phrases(texts) -> list[str]:
  """Maximal runs of capitalised words (the module docstring's extractor),
  most frequent first."""
  counts, capital_elsewhere, initial_only = collections.Counter(), set(), set()
  for text in texts:
    for sentence in re.split(r"(?<=[.!?])\s+", text):
      words = _WORD.findall(sentence)
      i = 0
      while i < len(words):
        if not _capitalised(words[i]):
          i += 1
          continue
        j = i + 1
        while j < len(words) and (_capitalised(words[j]) or (
            words[j] in CONNECTORS and j + 1 < len(words)
            and _capitalised(words[j + 1]))):
          j += 1
        first = i
        while first < j and words[first].lower() in LEADING:
          first += 1
        phrase = " ".join(words[first:j]).rstrip(".")
        if first == j:
          pass
        elif first == 0 and j == 1:
          initial_only.add(phrase)
        else:
          capital_elsewhere.update(phrase.split())
          counts[phrase] += 1
        i = j
  for word in initial_only & capital_elsewhere:
    counts[word] += 1
  return [p for p, _ in counts.most_common() if p]


def spacy_phrases(texts, model) -> list[str]:
  """spaCy's named entities and noun chunks of `texts`, most frequent first.

  Raises:
    DataError: spaCy or the model is not installed (saying how to install).
  """
  try:
    import spacy  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"--extractor spacy:{model} needs spaCy: pip install "
                    "spacy (or use --extractor capitalised)") from None
  try:
    nlp = spacy.load(model)
  except OSError:
    raise DataError(f"--extractor spacy:{model}: the spaCy model {model!r} is "
                    f"not installed: python -m spacy download {model} (or "
                    "use --extractor capitalised)") from None
  counts = collections.Counter()
  for doc in nlp.pipe(texts):
    counts.update(span.text.strip() for span in doc.ents)
    counts.update(span.text.strip() for span in doc.noun_chunks)
  return [p for p, _ in counts.most_common() if p]


def conll_entities(path) -> list[str]:
  """The gold entity strings of a CoNLL file, most frequent first."""
  from seqeval.metrics.sequence_labeling import get_entities  # pylint: disable=import-outside-toplevel
  from research.data import conll  # pylint: disable=import-outside-toplevel
  split = conll.read_conll(path)
  counts = collections.Counter()
  for words, tags in zip(split.tokens, split.tags):
    counts.update(" ".join(words[a:b + 1]) for _, a, b in get_entities(tags))
  return [p for p, _ in counts.most_common()]


def _table_texts(path, columns):
  with open(path, encoding="utf-8", newline="") as f:
    delimiter = "\t" if path.endswith(".tsv") else ","
    reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE
                            if delimiter == "\t" else csv.QUOTE_MINIMAL)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise DataError(f"{path}: no column {missing[0]!r}; columns: "
                      f"{', '.join(reader.fieldnames or ())}")
    return [row[c] for row in reader for c in columns]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m research.data.knowledge",
      description="Writes a knowledge list (one name per line) for masking "
                  "mode 'knowledge'.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--conll", help="a CoNLL file: its gold entity strings")
  source.add_argument("--table", help="a TSV/CSV file: text of --columns")
  source.add_argument("--text", help="a text file, one document per line")
  parser.add_argument("--columns", default="sentence",
                      help="--table's text columns, comma-separated")
  parser.add_argument("--extractor", default="capitalised",
                      help="capitalised | spacy:<model> (--table, --text)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    if args.conll:
      names = conll_entities(args.conll)
    else:
      texts = (_table_texts(args.table, args.columns.split(","))
               if args.table else
               open(args.text, encoding="utf-8").read().splitlines())
      if args.extractor.startswith("spacy:"):
        names = spacy_phrases(texts, args.extractor[len("spacy:"):])
      elif args.extractor == "capitalised":
        names = capitalised_phrases(texts)
      else:
        raise DataError(f"--extractor {args.extractor!r}; valid: "
                        "capitalised, spacy:<model>")
  except (DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("".join(n + "\n" for n in names))
  print(f"{len(names)} names -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
