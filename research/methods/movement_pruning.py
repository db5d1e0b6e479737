"""Movement pruning (Sanh, Wolf and Rush 2020), hard Top-v version.

"Movement Pruning: Adaptive Sparsity by Fine-Tuning": each target weight W
gets a score S (`PruningScores`, starting at 0); the forward pass uses
W * M with M the Top-v mask of S, and the gradient reaches S straight
through M (dL/dS = dL/dW' * W), so S accumulates -W dL/dW: weights moving
away from zero are kept, whatever their size. v follows the cubic schedule
(`research.methods.pruning.schedule`); after its last step the mask is fixed
and the pruned weights are set to 0.

    config.methods = ("movement_pruning",)
    config.method_options.movement_pruning = dict(sparsity=0.9)

The options are `magnitude_pruning`'s; `frequency` defaults to 1 (the paper
recomputes Top-v at every step). The scores train with the run's optimiser
and learning rate: with hard Top-v only their order matters, and from equal
starting values scaling their learning rate scales them all alike (the
paper's separate score learning rate matters for its soft variant). The
paper's distillation from the teacher is not part of this method. As for
magnitude pruning, the sparsity gives no speed without sparse kernels.

Short runs: the scores say which weights are moving away from zero, and a
weight that has barely moved has a score unrelated to its size. At the
first mask of the quickstart's 60-update run (update 16, 31% of each
layer) 57% of the removed weights were in their layer's top half by |W|,
as if chosen at random, and the training loss went from 0.31 to 2.64; on
MR the loss stayed near chance (0.70) after the masks began at update 80.
Magnitude pruning on the same schedules kept 0.867 (quickstart, 50%). The
paper prunes over epochs of SQuAD/MNLI after a warm-up of the scores;
`benchmarks/movement_probe.py` measures the choice (BENCHMARKS.md).
"""

from research.methods import magnitude_pruning

CONFIG = {**magnitude_pruning.CONFIG, "frequency": 1}


class Method(magnitude_pruning.Method):
  """See the module docstring."""
  CONFIG = CONFIG
  NAME = "movement_pruning"
  MOVEMENT = True
