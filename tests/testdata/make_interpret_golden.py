"""Regenerates tests/testdata/golden_interpret.npz.

    python tests/testdata/make_interpret_golden.py

Records what `research.interpret` gives (attention maps, integrated gradients
from three baselines, gradient x input, logits) on the tiny BERT and RoBERTa
of tests/test_interpret.py and on the packaged all-MiniLM-L6-v2 with a seeded
head, whose weights are stored too. It was first run on the instrumented
forward copy that `research.interpret` used before the model had hooks
(commit 0e76dcb); tests/test_interpret.py holds the rebuilt one to it.
"""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

import numpy as np  # pylint: disable=wrong-import-position

from tests import test_interpret  # pylint: disable=wrong-import-position


def main():
  models = test_interpret.golden_models()
  values = test_interpret.golden_values(models)
  for name, (model, _) in models.items():
    values[f"{name}/fingerprint"] = test_interpret.fingerprint(model)
  head = models["minilm"][0].classifier
  values["minilm/head/kernel"] = np.asarray(head.kernel[...])
  values["minilm/head/bias"] = np.asarray(head.bias[...])
  np.savez_compressed(HERE / "golden_interpret.npz", **values)


if __name__ == "__main__":
  main()
