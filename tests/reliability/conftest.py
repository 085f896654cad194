"""The reference run every interrupted run must reproduce (one per test process)."""
import pytest

from tests.reliability import runs


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """An uninterrupted smoke run: the result every interrupted run must reproduce."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr
  return workdir
