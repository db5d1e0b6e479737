"""The repository's promises: README commands, CI, experiment configs."""

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
