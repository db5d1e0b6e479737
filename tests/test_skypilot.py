"""launch/skypilot.yaml is a task that SkyPilot's own parser accepts.

SkyPilot pins click < 8.2, which wandb and huggingface-hub (click >= 8.2)
cannot share an environment with, so the parser runs in an environment of
its own that `uv` builds (and caches) from PyPI; nothing calls a cloud.
"""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK = REPO / "launch" / "skypilot.yaml"
# The SkyPilot release the task file was checked against (setup.py: test).
SKYPILOT = "skypilot==0.14.1"

PARSE = r"""
import json, sys
from sky.utils import dag_utils
# What `sky jobs launch launch/skypilot.yaml --env BUCKET=my-bucket` loads.
dag = dag_utils.load_chain_dag_from_yaml(
    sys.argv[1], env_overrides=[("BUCKET", "my-bucket")])
task, = dag.tasks
resources, = task.resources
storage = task.storage_mounts["/bucket"]
try:
  dag_utils.load_chain_dag_from_yaml(sys.argv[1])
  missing_bucket = None
except ValueError as e:
  missing_bucket = str(e)
# The schema check is real: a misspelt field is refused.
import pathlib, tempfile
bad = pathlib.Path(tempfile.mkdtemp()) / "bad.yaml"
bad.write_text(pathlib.Path(sys.argv[1]).read_text().replace(
    "use_spot:", "use_spots:"))
try:
  dag_utils.load_chain_dag_from_yaml(str(bad), env_overrides=[("BUCKET", "b")])
  misspelt = None
except Exception as e:  # SkyPilot's schema error
  misspelt = str(e)
print(json.dumps({
    "name": task.name, "workdir": task.workdir, "envs": task.envs,
    "setup": task.setup, "run": task.run,
    "use_spot": resources.use_spot,
    "accelerators": resources.accelerators,
    "job_recovery": resources.job_recovery,
    "bucket": [storage.name, storage.mode.value],
    "missing_bucket": missing_bucket, "misspelt": misspelt,
}))
"""


def _parse_with_skypilot():
  import uv  # pylint: disable=import-outside-toplevel
  out = subprocess.run(
      [uv.find_uv_bin(), "run", "--quiet", "--no-project",
       "--python", sys.executable, "--with", SKYPILOT,
       "python", "-c", PARSE, str(TASK)],
      capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


def test_skypilot_parses_the_managed_spot_job():
  task = _parse_with_skypilot()
  assert task["name"] == "research-bert" and task["workdir"] == "."
  assert task["use_spot"] is True
  assert task["accelerators"] == {"tpu-v5litepod-8": 1}
  # Preemptions are recovered; a failing trainer is not rerun.
  assert task["job_recovery"] == {"strategy": "FAILOVER",
                                  "max_restarts_on_errors": 0}
  assert task["bucket"] == ["my-bucket", "MOUNT"]
  assert "'BUCKET' is None" in task["missing_bucket"]
  assert "use_spots" in task["misspelt"]
  # The environment is launch.sh's venv; the run resumes from the bucket.
  assert task["setup"] == ('./launch.sh setup --python "$PYTHON" '
                           '--extras "$EXTRAS"')
  assert task["run"].split() == [
      "~/.venvs/research-bert/bin/python", "-m", "research.train", "\\",
      "--config", '"$EXPERIMENT"', "--workdir", '"/bucket/runs/$RUN"']
  envs = task["envs"]
  assert envs["PYTHON"] == "3.12" and envs["EXTRAS"] == "tpu,tfds,hf"
  assert (REPO / envs["EXPERIMENT"]).is_file()
