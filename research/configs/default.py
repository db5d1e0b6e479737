"""Every config field the trainer understands, with its default and meaning.

Experiments in `experiments/` start from `get_config()` here and change what
they need. `research.train` checks the final config against this schema before
anything is compiled: an unknown field or a wrong type fails with the field's
name and the nearest valid one.
"""

import ml_collections


def get_config():
  """Returns the default config (a locked `ml_collections.ConfigDict`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The PRNG of dropout, masking and noise keys: threefry | rbg | unsafe_rbg
  # (research/training/steps.py root_key). Every key is a function of
  # (seed, step) under each, so resume stays exact.
  c.prng_impl = "threefry"

  # --- Model -------------------------------------------------------------------
  # `name`: a Hugging Face model directory, a hub name (needs internet), or a
  # short alias from `research.models.hub.ALIASES` (e.g. "all-minilm-l6-v2",
  # the packaged offline checkpoint).
  c.model = ml_collections.ConfigDict()
  c.model.name = "all-minilm-l6-v2"
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"   # master weights
  c.model.attention_impl = "xla"    # xla | cudnn (jax.nn.dot_product_attention)
  c.model.hidden_dropout = -1.0     # < 0: keep the checkpoint's config.json
  c.model.attention_dropout = -1.0  # < 0: keep the checkpoint's config.json
  c.model.remat = False             # rematerialise each layer in backward
  # How the layers run (research/models/bert.py, BertModel.encode): scan (one
  # jax.lax.scan over their weights stacked at call time: one layer traced
  # instead of all) | unrolled | auto: scan on GPUs and TPUs, unrolled on
  # CPUs, where XLA compiled the scanned bert-base step no faster (7x less
  # tracing, twice the compile; BENCHMARKS.md). Unrolled wherever the layers
  # differ (pruned heads) or attention is sown.
  c.model.layers = "auto"
  # How sentence-level heads (classification, regression, NSP) read the
  # encoder (research/models/pooling.py): pooler (BERT's dense + tanh on
  # [CLS]) | cls ([CLS] alone) | mean | max (over the real tokens) | auto:
  # the checkpoint's own (a sentence-transformers directory's Pooling module,
  # e.g. mean for the packaged all-MiniLM-L6-v2, whose pooler was never
  # trained), otherwise pooler. Token-level tasks ignore it. Export: pooler
  # runs export as transformers' BertFor*; the others as a
  # sentence-transformers directory (docs/pooling.md).
  c.model.pooling = "auto"
  # Architecture options beyond Hugging Face's BERT (research/models/bert.py).
  # "checkpoint": as the checkpoint's config.json says (a Hugging Face BERT:
  # post, on). A model from scratch (masked_lm's task_options.architecture)
  # takes any; a checkpoint's weights were trained with its own, so asking
  # for the other is an error. A pre-LN model cannot be exported to Hugging
  # Face (its BertModel is post-LN); a bias-free one exports zero biases.
  c.model.layer_norm = "checkpoint"  # checkpoint | post | pre (before each sub-layer)
  c.model.bias = "checkpoint"        # checkpoint | on | off (encoder dense layers)
  # The seed of the weights the run initialises (the task head, a method's
  # new layers: LoRA, prefixes); -1: config.seed. Fixing it (0) while
  # config.seed varies gives runs that differ in data order and dropout but
  # start from the same head: the ingredients of a model soup
  # (research/soup.py; Wortsman et al. 2022 average runs of one start).
  c.model.init_seed = -1

  # --- Task, methods, evaluators ------------------------------------------------
  # A module of research/tasks/ (a dotted name: any module path):
  # sequence_classification (num_labels == 1 means regression),
  # token_classification, question_answering, masked_lm.
  c.task = "sequence_classification"
  c.num_labels = 2
  # The task's own options, checked against its module's Task.CONFIG (e.g.
  # question_answering: doc_stride, max_answer_length).
  c.task_options = ml_collections.ConfigDict()
  # Modules of research/methods/ applied in order, e.g. ("bitfit",); their
  # options in method_options.<name>, checked against each Method.CONFIG.
  c.methods = ()
  c.method_options = ml_collections.ConfigDict()
  # name -> {"type": a module of research/evaluators/, "split": an eval
  # split, options...}. Empty: the task's defaults, one evaluator per eval
  # split (metrics below).
  c.evals = ml_collections.ConfigDict()

  # --- Data --------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "local"            # local | tfds | hf
  c.data.name = ""                   # tfds "glue/sst2" or hf "nyu-mll/glue"
  c.data.hf_config = ""              # hf dataset config, e.g. "sst2"
  c.data.data_dir = ""               # tfds data_dir / hf cache_dir ("" = default)
  # Local files. eval_file: one path (split "validation"), or several as
  # "matched=dev_m.tsv,mismatched=dev_mm.tsv".
  c.data.train_file = ""
  c.data.eval_file = ""
  c.data.format = "auto"             # auto (by extension) | csv | tsv | jsonl
  c.data.train_split = "train"
  c.data.eval_splits = ("validation",)
  c.data.text_fields = ("sentence",)  # one text or a text pair
  c.data.label_field = "label"
  # The declared label set, in id order. Empty: integer labels are taken as
  # ids; string labels are sorted and numbered. Saved as labels.json.
  c.data.label_names = ()
  c.data.max_length = 128
  # Padded lengths (max_length is always one): one compilation each. Empty:
  # chosen from the training lengths (research.data.auto_buckets), and for
  # each evaluation split as many from its own in-order batches.
  c.data.buckets = ()
  # How many buckets auto_buckets may choose. <= 0: by platform: 8 on CPU
  # (padding is what costs there), 2 on GPU/TPU, where a bert-base shape
  # compiles in 20-40 s and the step's fixed part dwarfs the padding
  # (BENCHMARKS.md, "GPU: step, compile and MFU").
  c.data.num_buckets = -1
  # Chosen bucket widths are multiples of this. Coarser: fewer distinct
  # shapes across runs on similar data, so the persistent compilation cache
  # hits (a few-shot protocol's splits); finer: less padding.
  c.data.bucket_multiple = 4
  # Sequence packing for training: K > 1 puts K examples back to back in each
  # row (block-diagonal attention, positions restart per example; batch_size
  # stays the number of examples), and data.buckets are then row lengths.
  # Pays where padding dominates and attention is cheap (accelerators, short
  # texts); on a 2-core CPU it does not (BENCHMARKS.md). Evaluation is not
  # packed. Tasks that support it: sequence_classification.
  c.data.examples_per_row = 1
  # The training order: a module of research/data/samplers/ (bucketed,
  # shuffle, sequential, poisson; a dotted name: any module path). auto:
  # bucketed, or shuffle with packed rows. Options in sampler_options (e.g.
  # poisson's max_batch_size), checked against the module's CONFIG.
  c.data.sampler = "auto"
  c.data.sampler_options = ml_collections.ConfigDict()
  c.data.bad_rows = "error"          # error | skip (skipped rows are counted)
  c.data.cache_dir = ""              # tokenisation cache ("" = <workdir>/cache)

  # --- Optimisation ------------------------------------------------------------
  c.batch_size = 32                  # global batch, all devices together
  c.eval_batch_size = 64
  c.num_epochs = 3.0                 # used when total_steps <= 0
  c.total_steps = -1
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"         # adamw | adafactor | lamb
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.01    # masked off biases and LayerNorm
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.schedule = "linear"    # linear | cosine | constant (all warm up)
  c.optimizer.warmup_proportion = 0.1
  c.optimizer.warmup_steps = -1      # >= 0 overrides warmup_proportion
  c.optimizer.grad_clip_norm = 1.0   # <= 0: no clipping
  c.optimizer.grad_accum_steps = 1   # micro-batches per update
  # AdamW without accumulation as one fused pass (same maths, ~2x faster
  # update; optimizers.fused_adamw). False: optax's chain.
  c.optimizer.fused = True

  # --- Loop, evaluation, checkpoints -------------------------------------------
  c.log_every_steps = 10
  c.eval_every_steps = -1            # <= 0: once per epoch
  # Metrics computed on every eval split (research/metrics/common.py);
  # eval/loss is always logged.
  c.metrics = ("accuracy",)
  # Selects the best checkpoint: a metric (or "loss") of the first evaluator,
  # or "<evaluator>/<metric>".
  c.eval_metric = "accuracy"
  c.eval_metric_mode = "max"         # max | min
  c.early_stopping_patience = -1     # evaluations without improvement; <= 0 off
  c.checkpoint_every_steps = -1      # <= 0: at every evaluation
  c.keep_checkpoints = 2             # most recent kept, besides the best
  c.max_bad_steps = 10               # consecutive non-finite losses before stop

  # --- Parallelism (research/parallelism.py) -----------------------------------
  c.parallelism = ml_collections.ConfigDict()
  # jit: one program over the mesh, parameters sharded by logical axis names
  # (data parallel, FSDP, tensor parallel by mesh shape alone).
  # pmap: per-device program (jax.shard_map), replicated parameters, explicit
  # gradient all-reduce; the mesh must be data only.
  c.parallelism.strategy = "jit"
  c.parallelism.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1: the rest
  # Logical axis (models/bert.py) -> mesh axis; unnamed logical axes replicate.
  c.parallelism.logical_axis_rules = (
      ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
      ("kv", None), ("mlp", "tensor"))
  c.parallelism.prefetch = 2          # batches put on device ahead of the step
  c.parallelism.distributed = "auto"  # jax.distributed.initialize(): auto | on | off
  # CPU runs: glibc keeps freed memory for reuse, +15-20% examples/s on the
  # quickstart (research/training/host_memory.py). auto: when no TPU/GPU
  # runtime is installed | retain | default. Set by the command line, before
  # JAX starts; a notebook calling train_and_evaluate keeps its allocator.
  c.cpu_malloc = "auto"
  # XLA flags set before JAX starts (research/training/xla_flags.py): auto
  # adds the ones measured to help on GPUs (cuBLAS for every matrix product:
  # half the compile time of bert-base on an H200) | none | a flags string.
  c.xla_flags = "auto"
  # Persistent XLA compilation cache: reruns and resumed (preempted) runs
  # skip compiling. "" = off; JAX_COMPILATION_CACHE_DIR, when set, wins.
  c.compilation_cache_dir = "~/.cache/research_bert/xla"
  # Compile every batch shape the run will train on before step 1 (the data
  # plan knows them), so no bucket first met in a later epoch (packed rows,
  # rare long batches) stalls every host mid-run. False: compile on first use.
  c.precompile = True

  # --- Tracking ----------------------------------------------------------------
  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "auto"              # auto (online iff WANDB_API_KEY) | online | offline | disabled
  c.wandb.project = "research-bert"
  c.wandb.entity = ""
  c.wandb.group = ""
  c.wandb.name = ""
  c.wandb.tags = ()

  # --- Continual learning (python -m research.continual rounds) ------------------
  # Rounds of fine-tuning on feedback, each starting from the registry's
  # current version; the round trains with this config (its methods,
  # optimiser, epochs) on the round's data. research.train ignores it.
  c.continual = ml_collections.ConfigDict()
  c.continual.registry = ""          # the model registry's root (research/continual/registry.py)
  c.continual.base = ""              # a research.train workdir: the first version of an empty registry
  c.continual.feedback_db = ""       # research.serve's feedback store (any SQLAlchemy URL), or
  c.continual.feedback_file = ""     # a file of new labelled examples, read in order
  c.continual.rounds = 5             # rounds to run (a rerun goes on from the last finished one)
  c.continual.round_size = 100       # new examples per round (a round waits for that many)
  # Experience replay: replay_ratio earlier examples per new one, drawn from a
  # reservoir (a uniform sample of everything trained on before: the base
  # run's training file, then each promoted round's examples).
  c.continual.replay_ratio = 0.0
  c.continual.replay_capacity = 1000
  c.continual.replay_file = ""       # what seeds the reservoir ("": the base run's data.train_file)
  # Held-out files every version is scored on (config.metrics): the old
  # domain (forgetting) and the new one (gain). Both required.
  c.continual.old_eval_file = ""
  c.continual.new_eval_file = ""
  # The promotion gate: a candidate replaces the current version only if it
  # gains >= margin on the new held-out file and loses <= max_forgetting on
  # the old one (in config.eval_metric). promote: gate | always (every round
  # builds on the last: a study of forgetting) | never.
  c.continual.promote = "gate"
  c.continual.margin = 0.0
  c.continual.max_forgetting = 0.01
  # Logged requests replayed through the current and the candidate model
  # each round (their agreement is recorded); 0: no shadow evaluation.
  c.continual.shadow_requests = 0

  c.lock()
  return c
