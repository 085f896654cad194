"""What the method tests share: the commands (train, resume, vote, inspect, extract) run on a
model of one method, at step1.py's three-branch smoke scale, with the checks every method must
pass; each test adds what its method shows besides."""
import sys
from typing import Dict

import jax
import numpy as np

from one_jax.storage import checkpoints
from tests.reliability import runs


def main(method, *args):
  return runs.main([f"--config={runs.STEP1}:three_branch,smoke", f"--config.method={method}",
                    "--config.progress_bar=False", *args])


def surgery(*args):
  return runs.main(list(args), command=[sys.executable, "-m", "one_jax.surgery"])


def train_resume_vote_inspect_extract(tmp_path, method, *, deployed, branch, describe,
                                      first_args=(),
                                      deployed_variables=lambda v: v) -> Dict[str, object]:
  """Trains one epoch, resumes for the second, votes, inspects and extracts `branch`; checks
  that each command succeeds, that summary.txt names the `deployed` head, that inspect says
  `describe`, and that the extracted network's outputs equal the branch's in the deployed
  model (deployed_variables: of the checkpoint's variables; PCL's temporal mean). Returns the
  run's paths and the commands' results ('run', 'vote', 'header', 'voted', 'inspect')."""
  run, vote, student = (str(tmp_path / name) for name in ("run", "vote", "student"))
  first = main(method, f"--workdir={run}", "--config.num_epochs=1", *first_args)
  assert first.returncode == 0, first.stderr
  second = main(method, f"--workdir={run}")   # resumes for the second epoch
  assert second.returncode == 0 and "resuming" in second.stderr + second.stdout, second.stderr
  assert f"deployed head: {deployed}" in open(f"{run}/summary.txt").read()
  voted = main(method, f"--workdir={vote}", "--config.eval_only=True",
               f"--config.init_from={run}", "--config.vote=True")
  assert voted.returncode == 0 and "0+1+2" in voted.stdout, voted.stderr
  inspect = surgery("inspect", run)
  assert describe in inspect.stdout, inspect.stdout + inspect.stderr
  extracted = surgery("extract", f"--src={run}", f"--branch={branch}", f"--dst={student}")
  assert extracted.returncode == 0, extracted.stderr
  spec, variables = checkpoints.load(run)
  student_spec, student_vars = checkpoints.load(student)
  assert student_spec.kind == "cifar_resnet"
  images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  np.testing.assert_allclose(student_spec.build().apply(student_vars, images),
                             spec.build().apply(deployed_variables(variables),
                                                images).branch_logits[branch],
                             rtol=1e-5, atol=1e-5)
  header = open(f"{run}/metrics.csv").readline().strip().split(",")
  return {"run": run, "vote": vote, "header": header, "voted": voted, "inspect": inspect}
