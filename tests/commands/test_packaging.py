"""The source distribution carries everything the kernels need, and a wheel built from it
contains the compiled kernels (a failed kernel build would leave only its error record)."""
import ctypes
import os
import re
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ("one-jax-train", "one-jax-surgery", "one-jax-convert", "one-jax-bench",
            "one-jax-report")   # pyproject.toml's console scripts


def test_a_wheel_built_from_the_sdist_contains_the_compiled_kernels(tmp_path):
  # The sdist through setuptools' PEP 517 hook, as `python -m build --sdist` calls it.
  sdist_name = subprocess.run(
      [sys.executable, "-c", "import setuptools.build_meta as b, sys; "
       "print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout.split()[-1]
  sdist = tmp_path / sdist_name
  with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  for needed in ("pyproject.toml", "setup.py", "README.md", "DESIGN.md",
                 "one_jax/cpu/csrc/conv_kernels.cc", "one_jax/cpu/csrc/conv_kernels_simd.inc"):
    assert needed in names, needed

  # The wheel from the sdist alone: offline, against the installed jax (no build isolation).
  wheel_dir = tmp_path / "wheel"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "-q", "-w", str(wheel_dir), str(sdist)],
      cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (wheel,) = wheel_dir.glob("one_jax-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    libraries = [n for n in names if n.startswith("one_jax/cpu/_conv_kernels")
                 and n.endswith(".so")]
    assert len(libraries) == 1, names
    assert "one_jax/cpu/_conv_kernels_build_error.txt" not in names
    assert not any(n.endswith((".cc", ".inc")) for n in names)   # sources stay in the sdist
    entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    zf.extract(libraries[0], tmp_path / "unpacked")
  for command in COMMANDS:
    assert command in entry_points
  library = ctypes.CDLL(str(tmp_path / "unpacked" / libraries[0]))
  assert library.OneJaxConvForward and library.OneJaxConvWeightGrad   # the FFI handlers


def test_ci_runs_the_readme_test_command_exactly():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    after_heading = f.read().split("**Test:**", 1)[1]
  readme_command = after_heading.split("```bash\n", 1)[1].split("\n```", 1)[0]
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci_command = [l for l in f.read().splitlines() if l and not l.startswith("#")][-1]
  assert ci_command == readme_command
  assert readme_command.startswith("pip install torch==2.13.0 && ")   # the CPU build, first


def test_console_scripts_are_the_python_m_entry_points():
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["optional-dependencies"]["torch"] == ["torch>=2.4,<3"]
  scripts = project["scripts"]
  assert set(scripts) == set(COMMANDS)
  for target in scripts.values():
    module, function = target.split(":")
    with open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8") as f:
      source = f.read()
    assert f"def {function}():" in source, target
    assert f'if __name__ == "__main__":\n  {function}()' in source, target


def test_every_design_reference_resolves_inside_the_repository():
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "DESIGN.md"), encoding="utf-8") as f:
    sections = set(re.findall(r"^## (\d+)\. ", f.read(), flags=re.M))
  cited = {}
  for top in ("one_jax", "configs", "tests", "benchmarks", "launch", "README.md"):
    paths = [os.path.join(ROOT, top)] if top.endswith(".md") else [
        os.path.join(d, n) for d, _, names in os.walk(os.path.join(ROOT, top)) for n in names]
    for path in paths:
      if not path.endswith((".py", ".md", ".sh", ".sbatch")):
        continue
      with open(path, encoding="utf-8") as f:
        text = f.read()
      assert "../" + "shared" not in text, path   # the repository is all a user has
      for refs in re.findall(r"DESIGN\.md(?: sections?)? ([\d, and]*\d)", text):
        for n in re.findall(r"\d+", refs):
          cited.setdefault(n, []).append(os.path.relpath(path, ROOT))
  assert len(cited) >= 8, cited
  assert set(cited) <= sections, {n: p for n, p in cited.items() if n not in sections}


def test_the_docs_import_what_exists():
  """Every `from one_jax... import ...` line of the README's and DESIGN.md's code blocks runs."""
  lines = []
  for doc in ("README.md", "DESIGN.md"):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    lines += [l.strip() for b in blocks for l in b.splitlines()
              if re.match(r"\s*(from one_jax[\w.]* import |import one_jax)", l)]
  assert len(lines) >= 5, lines
  proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
