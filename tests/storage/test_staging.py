"""Output outside a run appears complete or not at all (one_jax.storage.staging): surgery, conversion
and step-2 preparation leave no partial output on any failure, signal or race, and clean up
what a killed writer left."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from one_jax.architectures import model_spec
from one_jax.storage import checkpoints, staging
from one_jax.surgery import __main__ as surgery_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _leftovers(directory):
  return sorted(n for n in os.listdir(directory) if ".tmp-" in n)


def _state(kind="one_resnet", branches=2):
  """A ResNet-8 checkpoint state of 3 classes (8x8 images)."""
  spec = model_spec.ModelSpec(kind, 8, 3, branches)
  state = {k: jax.tree.map(np.asarray, v)
           for k, v in spec.init(jax.random.key(0), (8, 8, 3)).items()}
  state["step"] = np.asarray(5, np.int64)
  return state, spec.to_dict()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  state, info = _state()
  path = str(tmp_path_factory.mktemp("src") / "one2")
  checkpoints.save_standalone(path, state, {"model": info, "epoch": 1})
  return path


def _surgery(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = surgery_cli.main(argv)
  return code, err.getvalue()


def test_failure_inside_the_block_removes_the_staging_folder(tmp_path):
  dst = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with staging.staged(str(dst)) as tmp:
      os.makedirs(tmp)
      (tmp_path / "out.marker").write_text("")
      raise RuntimeError("disk on fire")
  assert not dst.exists() and _leftovers(tmp_path) == []


def test_sigterm_inside_the_block_is_raised_and_cleans_up(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(staging.Terminated):
    with staging.staged(str(tmp_path / "out")) as tmp:
      os.makedirs(tmp)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises before this ends
  assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
  assert signal.getsignal(signal.SIGTERM) is before


def test_the_loser_of_a_race_for_one_destination_keeps_nothing(tmp_path):
  dst = tmp_path / "out"
  with pytest.raises(staging.DestinationTaken, match="was created by another command"):
    with staging.staged(str(dst)) as tmp:
      os.makedirs(os.path.join(tmp, "mine"))
      os.makedirs(dst / "theirs")   # the winner renames its complete output first
  assert os.listdir(dst) == ["theirs"] and _leftovers(tmp_path) == []
  # The rename never replaces: not an empty directory, not a file either.
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  with pytest.raises(FileExistsError):
    staging.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
  (tmp_path / "f").write_text("new")
  (tmp_path / "g").write_text("old")
  with pytest.raises(FileExistsError):
    staging.rename_noreplace(str(tmp_path / "f"), str(tmp_path / "g"))
  assert (tmp_path / "g").read_text() == "old"


def test_a_killed_writers_staging_folders_are_removed_by_the_next_write(source, tmp_path):
  dst = tmp_path / "five"
  dead = _dead_pid()
  # What this version leaves when killed outright, and what an older one left (no owner file).
  new_style = tmp_path / f"five.tmp-{dead}-0123abcd"
  (new_style / staging.PAYLOAD_NAME).mkdir(parents=True)
  (new_style / staging.OWNER_NAME).write_text(json.dumps(
      {"one_jax_staging": 1, "host": os.uname().nodename, "pid": dead, "start_time": 1}))
  old_style = tmp_path / f"five.tmp-{dead}"
  (old_style / "0").mkdir(parents=True)
  # A live writer's (this process's parent: alive) and another destination's stay.
  live = tmp_path / f"five.tmp-{os.getppid()}-89abcdef"
  live.mkdir()
  (live / staging.OWNER_NAME).write_text(json.dumps(
      {"one_jax_staging": 1, "host": os.uname().nodename, "pid": os.getppid(),
       "start_time": None}))
  other = tmp_path / f"other.tmp-{dead}"
  other.mkdir()
  code, err = _surgery(["expand", f"--src={source}", f"--dst={dst}", "--branches=3"])
  assert code == 0, err
  assert _leftovers(tmp_path) == sorted([live.name, other.name])
  assert model_spec.ModelSpec.from_dict(checkpoints.restore_raw(str(dst))[1]["model"]
                                        ).num_branches == 3


def test_a_dangling_symlink_destination_is_written_at_its_target(source, tmp_path):
  link = tmp_path / "link"
  os.symlink(tmp_path / "target", link)
  code, err = _surgery(["extract", f"--src={source}", "--branch=1", f"--dst={link}"])
  assert code == 0, err
  assert checkpoints.restore_raw(str(link))[1]["model"]["kind"] == "cifar_resnet"
  assert os.path.realpath(link) == str(tmp_path / "target") and _leftovers(tmp_path) == []
  # A link into a missing directory: refused before anything is computed or written.
  os.symlink(tmp_path / "nowhere" / "x", tmp_path / "bad_link")
  code, err = _surgery(["extract", f"--src={source}", "--branch=1",
                        f"--dst={tmp_path / 'bad_link'}"])
  assert code == 1 and err.count("\n") == 1 and "does not exist: create it first" in err
  assert not (tmp_path / "nowhere").exists()


def test_an_impossible_expansion_is_one_line(source, tmp_path):
  code, err = _surgery(["expand", f"--src={source}", f"--dst={tmp_path / 'big'}",
                        "--branches=1000000"])
  assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
  assert ("out of memory" in err or "branches" in err) and os.listdir(tmp_path) == []


# The child starts with Python's own SIGINT handler: a process inherits an ignored SIGINT from
# its parent (POSIX), and whether the test's worker ignores it depends on what ran there before.
_SLOW_SAVE = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from one_jax.storage import checkpoints
    from one_jax.surgery import __main__ as surgery_cli
    save = checkpoints.save
    def slow_save(*args, **kwargs):
      save(*args, **kwargs)
      open(sys.argv[1], "w").close()   # the checkpoint is half written: tell the test
      time.sleep(60)
    checkpoints.save = slow_save
    sys.exit(surgery_cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "SIGINT (Ctrl-C)"),
                                           (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_a_surgery_is_one_line_and_leaves_nothing(source, tmp_path, sig, code,
                                                                  word):
  ready, dst = tmp_path / "ready", tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(ready), "expand",
                           f"--src={source}", f"--dst={dst}", "--branches=4"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 120
  while not ready.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert _leftovers(tmp_path), "the staging folder should exist while writing"
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == code, err
  assert err.strip().splitlines() == [f"error: interrupted by {word}: no partial output was "
                                      "left behind"], err
  assert sorted(os.listdir(tmp_path)) == ["ready"]
