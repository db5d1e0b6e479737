"""Learning from feedback without forgetting.

    python -m research.continual --config experiments/continual_reviews.py:data_dir=... \
        --workdir /tmp/stream                       # rounds (rounds.py)
    python -m research.continual.registry list /tmp/registry
    python -m research.continual.registry rollback /tmp/registry

rounds.py    the rounds: feedback (research.serve's store, or a file) plus
             replayed earlier examples -> research.train from the current
             version -> a registered, gated candidate; resumable, each
             feedback row trained on once
registry.py  numbered immutable versions (an export and the config that
             loads it: servable, exportable, the next round's start), the
             current one, promotion and rollback history
gate.py      a version's held-out scores, the promotion decision, shadow
             replay of logged requests through two models
replay.py    the reservoir of earlier examples (uniform over the stream)
metrics.py   forgetting, backward transfer, gain

The regularisers are training methods (research/methods/ewc.py,
research/methods/l2_sp.py); a new LoRA adapter per round is `lora`;
model soups and ensembles of runs are research/soup.py.
"""
