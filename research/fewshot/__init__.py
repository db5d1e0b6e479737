"""Few-shot learning: the LM-BFF protocol and its building blocks.

    python -m research.fewshot --config experiments/fewshot_prompt.py \
        --workdir /tmp/fs/quickstart/prompt --k 16
    python -m research.fewshot --table /tmp/fs --out /tmp/fs/table.md

`sampling` (K-shot training and development sets, a pure function of the
seed), `protocol` (one run per split through `research.train`, the best
checkpoint on the development set tested, mean ± std over splits),
`table` (the Markdown table), `templates` (prompts and verbalizers for
`research/tasks/prompt.py`), `demonstrations` (LM-BFF's), `pairs`
(SetFit's contrastive pairs for `research/tasks/contrastive.py`).
"""
