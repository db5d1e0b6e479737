"""Regenerates the committed parity goldens from transformers' PyTorch models.

    pip install torch==2.13.0 && python tests/testdata/make_golden.py

Writes, next to this file:
  tiny_bert/            a small random BERT (config.json + model.safetensors),
  golden_tiny_bert.npz  its inputs and PyTorch BertModel outputs,
  golden_minilm.npz     inputs and outputs of the packaged all-MiniLM-L6-v2.
tests/test_models.py compares our model with these when torch is absent.
"""

import pathlib

import numpy as np
import torch
import transformers

HERE = pathlib.Path(__file__).parent

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2)


def tiny_inputs(vocab_size, seed=0):
  """A padded batch: lengths 11, 7 and 3 in a [3, 11] array, two segments."""
  rng = np.random.default_rng(seed)
  lengths = np.array([11, 7, 3])
  ids = rng.integers(1, vocab_size, size=(3, 11))
  mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int64)
  types = ((np.arange(11)[None] >= lengths[:, None] // 2) * mask).astype(np.int64)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def run(model, inputs):
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def main():
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**TINY)
  model = transformers.BertModel(cfg).eval()
  model.save_pretrained(HERE / "tiny_bert")
  inputs = tiny_inputs(cfg.vocab_size)
  hidden, pooled = run(model, inputs)
  np.savez(HERE / "golden_tiny_bert.npz", **inputs, last_hidden_state=hidden,
           pooler_output=pooled)

  from research.models import hf  # pylint: disable=import-outside-toplevel
  path = hf.resolve("all-minilm-l6-v2")
  model = transformers.BertModel.from_pretrained(str(path)).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  inputs = dict(tok(["The quick brown fox jumps over the lazy dog.",
                     "Padding must not change anything.", "Short."],
                    ["A second segment here.", "Yes.", "And another one"],
                    padding=True, return_tensors="np"))
  hidden, pooled = run(model, inputs)
  np.savez(HERE / "golden_minilm.npz", **inputs, last_hidden_state=hidden,
           pooler_output=pooled)


if __name__ == "__main__":
  main()
