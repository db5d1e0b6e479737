"""The repository's promises: README commands, CI, experiment configs."""

import ast
import importlib.util
import pathlib
import re

import pytest

from research.configs import validate

REPO = pathlib.Path(__file__).parent.parent


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
  text = (REPO / "README.md").read_text()
  first_blocks = re.findall(r"```bash\n(.+?)\n```", text[:1500], re.S)
  assert len(first_blocks) == 2
  run_command, test_command = first_blocks
  assert "research.train --config experiments/quickstart.py" in run_command
  assert "pytest" in test_command
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert test_command in ci


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (REPO / "experiments").glob("*.py")
                   if not p.name.startswith("_")))
def test_every_experiment_builds_and_validates(path):
  spec = importlib.util.spec_from_file_location("exp", REPO / "experiments" / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and "python" in module.__doc__, "docstring = command"
  validate(module.get_config())


# --- Layout: plug-in names only inside plug-ins, module sizes ------------------

PLUGIN_KINDS = ("tasks", "methods", "evaluators")
# Where a plug-in's name may appear outside its own module, and why.
ALLOWED = {
    # The schema's default task (`config.task`), as any config names one.
    ("research/configs/default.py", "sequence_classification"),
    # The model heads' registry: a head is named as the task that uses it.
    *(("research/models/heads.py", name) for name in (
        "sequence_classification", "token_classification",
        "question_answering", "masked_lm", "pre_training")),
    # A task's default evaluators (`EVALUATOR`, `default_evals`): config
    # values, as `config.evals.<name>.type` names them.
    ("research/tasks/common.py", "sequence"),
    ("research/tasks/sequence_classification.py", "sequence"),
    ("research/tasks/token_classification.py", "tagging"),
    ("research/tasks/question_answering.py", "span"),
    ("research/tasks/masked_lm.py", "token"),
    ("research/tasks/masked_lm.py", "pre_training"),
    ("research/tasks/prompt.py", "sequence"),
    ("research/tasks/contrastive.py", "embedding_probe"),
    # Masking modes (token, whole_word, span, knowledge) that share a word
    # with the token and span evaluators.
    ("research/data/masking.py", "token"),
    ("research/data/masking.py", "span"),
    # The attack's metric prefix (pgd_accuracy): the algorithm, not the
    # method plug-in.
    ("research/evaluators/robust.py", "pgd"),
    # nnx.LoRA's attribute in LoRADense's parameter paths, in the LoRA
    # family's own support code.
    ("research/methods/peft/hf_peft.py", "lora"),
}


def _plugin_names():
  """{name: {its module file}} of the shipped tasks, methods, evaluators."""
  names = {}
  for kind in PLUGIN_KINDS:
    for path in (REPO / "research" / kind).glob("*.py"):
      if not path.stem.startswith("_") and path.stem != "common":
        names.setdefault(path.stem, set()).add(path)
  return names


def _string_constants(tree):
  """(line, text) of every str constant that is not a docstring."""
  docs = {id(node.body[0].value) for node in ast.walk(tree)
          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                               ast.AsyncFunctionDef))
          and node.body and isinstance(node.body[0], ast.Expr)
          and isinstance(node.body[0].value, ast.Constant)}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docs):
      yield node.lineno, node.value


def test_plugin_names_appear_only_inside_their_plugins():
  """No code outside a task, method or evaluator module names it: the core
  asks a plug-in what it can do (a capability or a hook) instead."""
  names = _plugin_names()
  assert {"lora", "dp_sgd", "smart", "sequence_classification", "span"} \
      <= set(names)
  found = []
  for path in sorted((REPO / "research").rglob("*.py")):
    rel = str(path.relative_to(REPO))
    for line, text in _string_constants(ast.parse(path.read_text())):
      candidates = [text, text.rsplit(".", 1)[-1]
                    if text.startswith("research.") else None]
      for name in filter(None, candidates):
        if name in names and path not in names[name] and \
            (rel, name) not in ALLOWED:
          found.append(f"{rel}:{line}: {text!r}")
  assert not found, "plug-in names outside their plug-ins:\n" + "\n".join(found)


def test_no_module_is_too_long():
  lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
             for p in (REPO / "research").rglob("*.py")}
  assert lengths["research/train.py"] < 550
  long = {p: n for p, n in lengths.items() if n > 700}
  assert not long, long
