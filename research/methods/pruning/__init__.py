"""Support code of the pruning methods (`research/methods/*_pruning.py`).

  layers.py    PrunedDense: a dense layer computing with `kernel * mask`
               (movement pruning: the mask straight-through to its scores);
               merge (mask folded into the kernel); sparsity per layer
  schedule.py  Zhu & Gupta's cubic sparsity schedule and the optax wrapper
               that owns the masks: recomputed on the schedule's steps after
               each update, carried in the trained state (exact resume)
  heads.py     attention-head importance (Michel et al. 2019) and the heads
               to remove; the cut itself is `BertModel.prune_heads`
"""
