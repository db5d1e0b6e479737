r"""Time to result: our `research.train` against a Hugging Face PyTorch loop
on the same job, each timed from its command's start to its final metrics.

    # classification: SentEval MR (8,529 training sentences), 1 epoch
    python benchmarks/end_to_end.py \
        --config=experiments/distill.py:data=mr,data_dir=../shared/data/senteval_mr \
        --config.num_epochs=1 --warm
    # NER: the first 3,000 CoNLL-2003 training sentences, 1 epoch
    mkdir -p /tmp/conll3k && head -n 42572 ../shared/data/conll2003/train.txt \
        > /tmp/conll3k/train.txt
    python benchmarks/end_to_end.py \
        --config=experiments/conll2003.py:model=all-minilm-l6-v2,source=local,train_file=/tmp/conll3k/train.txt,eval_file=../shared/data/conll2003/valid.txt \
        --config.num_epochs=1 --config.optimizer.learning_rate=1e-4
    # QA: the shared SQuAD articles (9 to train, 1 to evaluate), windows of
    # 192 tokens, stride 64, 1 epoch
    python -m research.data.squad ../shared/data/squad/train-v2.0_first10articles.json \
        /tmp/squad10 --dev_articles 5
    python benchmarks/end_to_end.py \
        --config=experiments/squad_v2.py:model=all-minilm-l6-v2,source=local,train_file=/tmp/squad10/train-v2.0_first10articles-train.json,eval_file=/tmp/squad10/train-v2.0_first10articles-dev.json,max_length=192,doc_stride=64 \
        --config.num_epochs=1 --config.optimizer.learning_rate=1e-4 --config.batch_size=16

The two sides run one after the other (never together), each in its own
process:

  ours  `python -m research.train` with the same `--config` flags, a fresh
        workdir and a fresh persistent compilation cache (cold: every shape
        compiles); with --warm, once more on that cache.
  HF    this file's `hf_worker`: transformers' AutoModelFor{Sequence,Token}
        Classification / QuestionAnswering from the same checkpoint with the
        same dropout, AdamW and schedule as the Trainer builds them
        (`compare_torch.hf_optimizer`), the same number of updates in Hugging
        Face's order (a random permutation each epoch, each batch padded to
        its longest example, as DataCollatorWithPadding), then one pass over
        the evaluation splits. So that both sides do the same work, it reads
        and tokenises the data with our loaders (the same rows, tokens and
        labels; they import JAX, whose import time is reported) and scores
        its outputs with our evaluators (the same metric code).

Both evaluate once, after the last update (the script sets
`config.eval_every_steps` past the end); W&B runs as the config says (pass
`--config.wandb.mode=disabled` to leave its start-up out). Printed: each side's wall time from
its process's start to its exit, its CPU time and peak resident memory (the
process's own `wait4` usage), the phases each reports (ours: tracing and
compiling the update's shapes; HF: imports, data, model, training,
evaluation), the eval metrics, and ours / HF ratios. HF's model keeps BERT's
pooler where ours may pool otherwise (`config.model.pooling`): the same
cost, not always the same accuracy. CPU only (the GPU comparison of the step
is `compare_torch.py`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

# Our task module -> (transformers' model class, its outputs as our task's
# `eval_outputs` takes them).
HF_MODELS = {
    "sequence_classification": ("AutoModelForSequenceClassification",
                                lambda o: o.logits),
    "token_classification": ("AutoModelForTokenClassification",
                             lambda o: o.logits),
    "question_answering": ("AutoModelForQuestionAnswering",
                           lambda o: (o.start_logits, o.end_logits)),
}
# A run evaluates once, after its last update.
ONCE = "--config.eval_every_steps=1000000000"
COMPILED = re.compile(r"compiled the update for the run's (\d+) batch shapes: "
                      r"traced in ([\d.]+) s, compiled in ([\d.]+) s")


def timed_process(cmd, log_path, env=None) -> dict:
  """Runs `cmd` (output to `log_path`); its wall, CPU time and peak RSS."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  code = os.waitstatus_to_exitcode(status)
  if code != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}:\n{tail}")
  return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
          "peak_rss_gb": usage.ru_maxrss / 2**20}


def run_ours(config_argv, workdir, cache_dir) -> dict:
  """`research.train` from the command line: wall, compile, metrics."""
  cmd = [sys.executable, "-m", "research.train", *config_argv, ONCE,
         f"--config.compilation_cache_dir={cache_dir}", f"--workdir={workdir}"]
  os.makedirs(workdir, exist_ok=True)
  out = timed_process(cmd, os.path.join(workdir, "train.log"))
  with open(os.path.join(workdir, "train.log")) as f:
    found = COMPILED.search(f.read())
  if found:
    out.update(shapes=int(found[1]), trace_s=float(found[2]),
               compile_s=float(found[3]))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  out["metrics"] = {k: v for k, v in summary.items() if k.startswith("eval/")}
  return out


def run_hf(config_argv, workdir, threads=None) -> dict:
  """`hf_worker` in a subprocess: wall, phases, metrics."""
  os.makedirs(workdir, exist_ok=True)
  spec = {"config_argv": list(config_argv) + [ONCE],
          "out": os.path.join(workdir, "result.json"),
          "threads": threads or len(os.sched_getaffinity(0))}
  with open(os.path.join(workdir, "spec.json"), "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p]))
  out = timed_process([sys.executable, os.path.abspath(__file__), "--hf_worker",
                       os.path.join(workdir, "spec.json")],
                      os.path.join(workdir, "worker.log"), env=env)
  with open(spec["out"]) as f:
    out.update(json.load(f))
  return out


def hf_worker(spec_path) -> None:
  """The Hugging Face side, in its own process (see the module docstring)."""
  # pylint: disable=import-outside-toplevel
  marks = {"start": time.perf_counter()}
  with open(spec_path) as f:
    spec = json.load(f)
  import numpy as np
  import torch
  import transformers
  marks["torch imported"] = time.perf_counter()
  from absl import flags
  from ml_collections import config_flags
  from compare_torch import hf_optimizer, optimizer_spec
  from research import data, evaluators, tasks
  from research.data import batching
  from research.models import hf
  from research.tasks import common as task_common
  from research.training import optimizers
  import jax
  marks["ours imported"] = time.perf_counter()

  argv = ["end_to_end"] + spec["config_argv"]
  # ml_collections reads the overrides from `sys_argv` (default sys.argv).
  config_flags.DEFINE_config_file("config", None, "the experiment",
                                  sys_argv=argv)
  flags.FLAGS(argv)
  config = flags.FLAGS.config
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(config.seed)
  transformers.logging.set_verbosity_error()
  model_dir = str(hf.resolve(config.model.name))
  tokenizer = data.load_tokenizer(model_dir)
  task = tasks.load(config, tokenizer)
  kind = type(task).__module__.rsplit(".", 1)[-1]
  if kind not in HF_MODELS:
    raise SystemExit(f"end_to_end: config.task={config.task!r} has no "
                     f"Hugging Face model here; valid: {', '.join(HF_MODELS)}")
  opt_config = config.optimizer
  if opt_config.name != "adamw" or opt_config.grad_accum_steps != 1:
    raise SystemExit(
        "end_to_end mirrors AdamW without accumulation: needs "
        "config.optimizer.name='adamw' and config.optimizer.grad_accum_steps=1, "
        f"got {opt_config.name!r} and {opt_config.grad_accum_steps}")
  train_split, eval_splits, _, _ = (task.load_data or data.load_splits)(
      config, tokenizer, cache_dir=None)
  marks["data"] = time.perf_counter()

  cls_name, hf_outputs = HF_MODELS[kind]
  kwargs = task_common.dropout_overrides(config.model)
  if kind != "question_answering":
    kwargs["num_labels"] = task.num_outputs()
  model = getattr(transformers, cls_name).from_pretrained(model_dir, **kwargs)
  size = config.batch_size
  steps_per_epoch = len(train_split) // size
  total = optimizers.steps_from_config(config, steps_per_epoch)
  opt, sched = hf_optimizer(model, optimizer_spec(config.optimizer, total))
  marks["model"] = time.perf_counter()

  def tensors(host):
    out = {k: torch.from_numpy(np.asarray(host[k], np.int64))
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    for field in task.label_fields():  # labels, or start/end positions
      value = np.asarray(host[field.name])
      out[field.name] = torch.from_numpy(
          value.astype(np.float32 if value.dtype.kind == "f" else np.int64))
    return out

  # Batches as Hugging Face makes them: a random permutation each epoch
  # (the remainder dropped, as ours), each padded to its longest example.
  assemble = batching.Batcher(train_split, size, (config.data.max_length,),
                              shuffle=False)._assemble  # pylint: disable=protected-access
  lengths = np.diff(train_split.offsets)
  model.train()
  losses = []
  for step in range(total):
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(
        len(train_split))
    idx = order[i * size:(i + 1) * size]
    loss = model(**tensors(assemble(idx, int(lengths[idx].max())))).loss
    loss.backward()
    if config.optimizer.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(),
                                     config.optimizer.grad_clip_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
  marks["train"] = time.perf_counter()

  # One pass over each evaluation split, in order, batches padded to their
  # longest; our task turns the outputs into what our evaluators read.
  model.eval()
  outputs = {}
  with torch.inference_mode():
    for name, split in eval_splits.items():
      assemble = batching.Batcher(split, config.eval_batch_size,
                                  (config.data.max_length,), shuffle=False
                                  )._assemble  # pylint: disable=protected-access
      lengths = np.diff(split.offsets)
      rows = []
      for lo in range(0, len(split), config.eval_batch_size):
        idx = np.arange(lo, min(len(split), lo + config.eval_batch_size))
        host = assemble(idx, int(lengths[idx].max()))
        raw = hf_outputs(model(**{k: torch.from_numpy(np.asarray(host[k], np.int64))
                                  for k in ("input_ids", "attention_mask",
                                            "token_type_ids")}))
        raw = jax.tree.map(lambda t: t.float().numpy(), raw)
        rows.append((host, jax.tree.map(np.asarray,
                                        task.eval_outputs(raw, host))))
      outputs[name] = rows
  batchers = {name: batching.Batcher(split, config.eval_batch_size,
                                     (config.data.max_length,), shuffle=False)
              for name, split in eval_splits.items()}
  built = evaluators.build(config, task, eval_splits, batchers,
                           make_step=lambda logits: None, sharding=None)
  metrics = {}
  for name, evaluator in built.items():
    split_name = next(n for n, s in eval_splits.items() if s is evaluator.split)
    evaluator.outputs = lambda params, frozen, rows=outputs[split_name]: iter(rows)
    prefix = evaluators.prefix(name, list(built))
    metrics.update({prefix + k: float(v) for k, v in
                    evaluator.run(None, None).items()})
  marks["eval"] = time.perf_counter()
  names = list(marks)
  phases = {b: marks[b] - marks[a] for a, b in zip(names, names[1:])}
  with open(spec["out"], "w") as f:
    json.dump({"phases_s": phases, "metrics": metrics, "steps": total,
               "final_loss": losses[-1] if losses else None,
               "torch": torch.__version__,
               "transformers": transformers.__version__,
               "threads": torch.get_num_threads()}, f)


def hf_wall(hf_side) -> float:
  """HF's wall time less the import of our loaders' JAX stack."""
  return hf_side["wall_s"] - hf_side["phases_s"]["ours imported"]


def report(results) -> str:
  """The side-by-side table (markdown)."""
  hf_side = results.get("hf")
  # The HF side reads data with our loaders, whose import (the JAX stack) a
  # Hugging Face user would not pay: the ratio leaves it out of HF's time.
  lines = ["| run | wall s | CPU s | peak RSS GB | phases | metrics | "
           "HF wall (less our imports) / this wall |",
           "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    if name == "hf":
      phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items())
    else:
      phases = (f"{r['shapes']} shapes: trace {r['trace_s']:.1f}, compile "
                f"{r['compile_s']:.1f}" if "shapes" in r else "")
    metrics = ", ".join(f"{k.split('/')[-1]} {v:.4f}"
                        for k, v in r["metrics"].items()
                        if not k.endswith("/loss"))
    ratio = (f"{hf_wall(hf_side) / r['wall_s']:.2f}x"
             if hf_side and name != "hf" else "")
    lines.append(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                 f"{r['peak_rss_gb']:.2f} | {phases} | {metrics} | {ratio} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="Every --config.<field>=<value> is passed to both sides.")
  parser.add_argument("--config", required=True,
                      help="experiments/<name>.py[:arg], as research.train's")
  parser.add_argument("--warm", action="store_true",
                      help="Also rerun ours on the cache the cold run filled.")
  parser.add_argument("--skip", choices=("ours", "hf"), default=None)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: this process's cores)")
  parser.add_argument("--keep", default="",
                      help="Keep the runs here (default: a temporary folder).")
  parser.add_argument("--json", default="", help="Also write the results here.")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}: only --config.<field>=<value> "
                 "overrides pass through")
  config_argv = [f"--config={args.config}", *rest]
  root = args.keep or tempfile.mkdtemp(prefix="end_to_end_")
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average (1 min) at start "
        f"{os.getloadavg()[0]:.2f}, {len(os.sched_getaffinity(0))} cores; "
        f"runs in {root}", flush=True)
  results = {}
  try:
    if args.skip != "ours":
      cache = os.path.join(root, "xla_cache")
      results["ours, cold cache"] = run_ours(
          config_argv, os.path.join(root, "ours_cold"), cache)
      print("ours, cold:", json.dumps(results["ours, cold cache"]), flush=True)
      if args.warm:
        results["ours, warm cache"] = run_ours(
            config_argv, os.path.join(root, "ours_warm"), cache)
    if args.skip != "hf":
      results["hf"] = run_hf(config_argv, os.path.join(root, "hf"),
                             args.threads)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  print(report(results))
  print(f"(1-minute load average at the end: {os.getloadavg()[0]:.2f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--hf_worker":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    hf_worker(sys.argv[2])
  else:
    main()
