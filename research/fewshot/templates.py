"""Prompt templates and verbalizers (PET, LM-BFF), tokenised for a masked LM.

A template is text with slots for the example's texts and one mask slot:

    "<s1> It was [MASK] ."            one sentence (LM-BFF's SST-2 / MR / CR)
    "<s1> ? [MASK] , <s2>"            a pair (LM-BFF's RTE / QNLI)

`<s1>`, `<s2>` are the text columns (`config.data.text_fields`, in order);
`[MASK]` (or `<mask>`) is where the masked LM predicts the label word. The
words between slots are tokenised on their own, so "It was" becomes the same
tokens whatever the sentence is.

A verbalizer maps each label to one or more words,
"negative=terrible,positive=great" or "0=terrible|bad,1=great|good": a key
is a label name or a label id (`lookup`), so "0=..,1=.." reads GLUE TSVs
("0"/"1") and Hugging Face ClassLabels ("neg"/"pos") alike. A word
the tokenizer splits into several pieces is scored at the one mask position
by its first piece (`multi_token="first"`, PET's and LM-BFF's one-token
rule applied to the word's start) or by the mean of its pieces' logits
(`"mean"`); a label with several words scores the mean of its words. Both
are linear in the masked LM's logits, so the whole verbalizer is one matrix
`weights` [labels, ids] over the distinct token ids `ids`: label logits =
weights @ token logits[ids] (`Verbalizer`).

Truncation never cuts the mask or the template's own words: only the text
slots are shortened, the longest first, until the prompt fits max_length.
Demonstrations (LM-BFF) follow the prompt, each the template filled with a
training example and its label's first word in place of the mask; they share
the room the prompt leaves, are truncated the same way, and one that cannot
fit its template is left out.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from research.configs.plugins import ConfigError

MASKS = ("[MASK]", "<mask>")
MULTI_TOKEN = ("first", "mean")
_PIECE = re.compile(r"(<s\d+>|\[MASK\]|<mask>)")


@dataclasses.dataclass(frozen=True)
class Template:
  """A parsed template: ("text", words) | ("slot", column index) | ("mask",).

  Attributes:
    parts: the template's pieces, in order.
    source: the template string, for messages.
  """
  parts: tuple
  source: str

  @classmethod
  def parse(cls, text, num_texts, field="config.task_options.template"):
    """Parses `text`; every slot `<sK>` must name a text column (1-based).

    Raises:
      ConfigError: no mask or several, a slot beyond the text columns, a
        column used twice or not at all.
    """
    parts, slots = [], []
    for piece in _PIECE.split(text):
      if not piece.strip():
        continue
      if piece in MASKS:
        parts.append(("mask",))
      elif re.fullmatch(r"<s\d+>", piece):
        index = int(piece[2:-1]) - 1
        if not 0 <= index < num_texts:
          raise ConfigError(f"{field}={text!r}: slot {piece} but the data has "
                            f"{num_texts} text column(s) (<s1>"
                            f"{', <s2>' if num_texts > 1 else ''})")
        parts.append(("slot", index))
        slots.append(index)
      else:
        parts.append(("text", piece.strip()))
    if sum(p[0] == "mask" for p in parts) != 1:
      raise ConfigError(f"{field}={text!r} needs exactly one mask slot "
                        f"({' or '.join(MASKS)})")
    if sorted(slots) != list(range(num_texts)):
      raise ConfigError(f"{field}={text!r}: every text column must appear "
                        f"once (<s1> .. <s{num_texts}>); found "
                        f"{[f'<s{i + 1}>' for i in slots]}")
    return cls(tuple(parts), text)


def lookup(mapping, label, names=()):
  """The words of `label` in a verbalizer mapping, or None.

  `label` is a label name or a raw label: the mapping's key may be the name
  itself, the label's id in `names` ("0" for names[0]), or, for a raw label
  that is an id, the name it stands for.
  """
  label = str(label)
  if label in mapping:
    return mapping[label]
  names = [str(n) for n in names]
  if label in names and str(names.index(label)) in mapping:
    return mapping[str(names.index(label))]
  if label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
    return mapping.get(names[int(label)])
  return None


def word_ids(tokenizer, word):
  """The token ids of `word` as it reads after a space (BPE: "Ġword")."""
  return list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class Verbalizer:
  """Label words as one linear map on the masked LM's token logits.

  Attributes:
    words: per label (id order), its words.
    ids: int32 [U], the distinct token ids whose logits are read.
    weights: float32 [labels, U]; label logits = token logits[ids] @ weights.T.
    first_ids: per label, the token ids of its first word (what a
      demonstration puts in place of the mask).
  """
  words: tuple
  ids: np.ndarray
  weights: np.ndarray
  first_ids: tuple

  @staticmethod
  def parse_spec(spec, field="config.task_options.verbalizer") -> dict:
    """"a=w1|w2,b=w3" -> {"a": ("w1", "w2"), "b": ("w3",)}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
      label, sep, words = (p.strip() for p in item.partition("="))
      words = tuple(w.strip() for w in words.split("|") if w.strip())
      if not sep or not label or not words:
        raise ConfigError(f"{field}={spec!r}: {item!r} is not label=word "
                          "(several words: label=word1|word2)")
      if label in out:
        raise ConfigError(f"{field}={spec!r}: label {label!r} given twice")
      out[label] = words
    if not out:
      raise ConfigError(f"{field} is empty; give label=word for every label, "
                        "e.g. 'negative=terrible,positive=great'")
    return out

  @classmethod
  def build(cls, mapping, label_names, tokenizer, multi_token="first",
            field="config.task_options.verbalizer"):
    """The verbalizer of `mapping` ({label: words}) over `label_names`.

    Raises:
      ConfigError: a label without words, a word the tokenizer reads as
        unknown, an unknown `multi_token`.
    """
    if multi_token not in MULTI_TOKEN:
      raise ConfigError(f"config.task_options.multi_token={multi_token!r}; "
                        f"valid: {', '.join(MULTI_TOKEN)}")
    mapping = {str(n): lookup(mapping, n, label_names) for n in label_names}
    missing = [n for n, words in mapping.items() if words is None]
    if missing:
      raise ConfigError(f"{field}: no words for label(s) {missing}; the "
                        f"labels are {list(map(str, label_names))}")
    unk = getattr(tokenizer, "unk_token_id", None)
    pieces = []  # per label, per word: the token ids that score it
    for name in label_names:
      per_word = []
      for word in mapping[str(name)]:
        ids = word_ids(tokenizer, word)
        if not ids or (unk is not None and unk in ids):
          raise ConfigError(f"{field}: the word {word!r} of label {name!r} is "
                            "unknown to the tokenizer")
        per_word.append(ids[:1] if multi_token == "first" else ids)
      pieces.append(per_word)
    ids = np.asarray(sorted({i for p in pieces for w in p for i in w}),
                     np.int32)
    column = {int(t): j for j, t in enumerate(ids)}
    weights = np.zeros((len(label_names), len(ids)), np.float32)
    for label, per_word in enumerate(pieces):
      for word in per_word:
        for token in word:
          weights[label, column[token]] += 1.0 / (len(per_word) * len(word))
    return cls(words=tuple(mapping[str(n)] for n in label_names), ids=ids,
               weights=weights,
               first_ids=tuple(tuple(word_ids(tokenizer, mapping[str(n)][0]))
                               for n in label_names))

  def label_logits(self, token_logits):
    """[..., U] logits of `ids` -> [..., labels] (numpy or jax)."""
    return token_logits @ self.weights.T


def truncate_longest_first(lengths, budget):
  """New lengths summing to at most `budget`, the longest cut first.

  Ties are cut from the later text (as Hugging Face's longest_first cuts the
  second of two equal texts first). Every length stays >= 0.
  """
  lengths = [int(n) for n in lengths]
  excess = sum(lengths) - budget
  while excess > 0:
    longest = max(lengths)
    i = len(lengths) - 1 - lengths[::-1].index(longest)
    # A single longest text is cut down to the next length at once; tied
    # ones one token at a time, so that they end within one of each other.
    second = max([n for n in lengths if n < longest], default=0)
    cut = min(excess, longest - second) if lengths.count(longest) == 1 else 1
    lengths[i] -= cut
    excess -= cut
  return lengths


class PromptEncoder:
  """Tokenises examples through a template, with optional demonstrations.

  Args:
    tokenizer: a Hugging Face fast tokenizer with [CLS]/[SEP]/[MASK] (or
      RoBERTa's equivalents).
    template: a `Template`.
    max_length: the most tokens of a whole input, special tokens included.
  """

  def __init__(self, tokenizer, template, max_length):
    self.template = template
    self.max_length = max_length
    self.cls = tokenizer.cls_token_id
    self.sep = tokenizer.sep_token_id
    self.mask = tokenizer.mask_token_id
    if None in (self.cls, self.sep, self.mask):
      raise ConfigError("the prompt task needs a tokenizer with [CLS], [SEP] "
                        "and [MASK] tokens (a masked LM's)")
    self.fixed = {}
    for part in template.parts:
      if part[0] == "text":
        # After a space, as inside a sentence (BPE: "Ġword"; WordPiece
        # ignores it).
        self.fixed[part[1]] = list(tokenizer(" " + part[1],
                                             add_special_tokens=False)
                                   ["input_ids"])
    # Template tokens besides the slots: its words and the mask.
    self.fixed_length = 1 + sum(len(v) for v in self.fixed.values())
    if 2 + self.fixed_length + sum(1 for p in template.parts
                                   if p[0] == "slot") > max_length:
      raise ConfigError(f"config.data.max_length={max_length} leaves no room "
                        f"for the text of template {template.source!r} "
                        f"({self.fixed_length} template tokens + [CLS], "
                        "[SEP])")

  def fill(self, text_ids, budget, label_ids=None):
    """One filled template: (ids, mask index or -1) within `budget` tokens.

    Args:
      text_ids: per text column, its token ids (no special tokens).
      budget: the most tokens the filled template may take.
      label_ids: ids in place of the mask (a demonstration), or None.

    Returns:
      (ids, position of the mask in ids), or None if even empty slots do
      not fit the budget.
    """
    mask_cost = 1 if label_ids is None else len(label_ids)
    fixed = self.fixed_length - 1 + mask_cost
    room = budget - fixed
    if room < 0:
      return None
    keep = truncate_longest_first([len(t) for t in text_ids], room)
    ids, mask_at = [], -1
    for part in self.template.parts:
      if part[0] == "text":
        ids += self.fixed[part[1]]
      elif part[0] == "slot":
        ids += list(text_ids[part[1]][:keep[part[1]]])
      elif label_ids is None:
        mask_at = len(ids)
        ids.append(self.mask)
      else:
        ids += list(label_ids)
    return ids, mask_at

  def encode(self, text_ids, demos=()):
    """[CLS] prompt [SEP] (demo [SEP])*: (input_ids, token_type_ids, mask).

    Args:
      text_ids: per text column, the example's token ids.
      demos: (text_ids, label word ids) of each demonstration, in order.

    Returns:
      (int32 ids [n], int8 token types [n]: 0 prompt, 1 demonstrations, the
      mask's position).
    """
    prompt, mask_at = self.fill(text_ids, self.max_length - 2)
    ids = [self.cls] + prompt + [self.sep]
    types = [0] * len(ids)
    if demos:
      share = (self.max_length - len(ids)) // len(demos)
      for demo_text, label_ids in demos:
        filled = self.fill(demo_text, share - 1, label_ids)
        if filled is None:
          continue
        ids += filled[0] + [self.sep]
        types += [1] * (len(filled[0]) + 1)
    return (np.asarray(ids, np.int32), np.asarray(types, np.int8),
            mask_at + 1)
