"""Tasks: one module per task, found by naming convention.

`config.task = "<name>"` is `research/tasks/<name>.py`; a name with a dot is a
full module path (`config.task = "tests.test_core_plugins"`), so a task
defined anywhere trains with no edit to `research/`. The module defines
`Task(config, tokenizer=None)`, usually a subclass of `common.Task`: the head
it uses, how rows become features, its per-example loss, its predictions and
its default evaluators. Its options live in `config.task_options`, checked
against the module's `Task.CONFIG`.
"""

from research.configs import plugins

PACKAGE = "research.tasks"


def module(name):
  """The task module `name` (ConfigError listing the valid ones)."""
  return plugins.module(PACKAGE, name, "config.task", "Task")


def available():
  """The task modules shipped in research/tasks/."""
  return plugins.available(PACKAGE)


def load(config, tokenizer=None):
  """The run's task: `module(config.task).Task(config, tokenizer)`.

  Raises:
    ConfigError: an unknown task, or task options it does not have.
  """
  cls = module(config.task).Task
  from research.tasks import common  # pylint: disable=import-outside-toplevel
  if issubclass(cls, common.Task):
    plugins.check_overrides(cls, common.Task, ("finish", "loss", "predict"),
                            "config.task", config.task)
  return cls(config, tokenizer)
