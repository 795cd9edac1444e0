"""The command layer: no library module imports simflow_jax.commands, no command imports
another, and each command validates its config exactly once."""
import ast
import os
import shutil

import pytest

from configs import base, tiny
from simflow_jax.commands import dry_run, evaluate, likelihood, sample, train
from simflow_jax.models import build

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "simflow_jax")
COMMANDS = os.path.join(PACKAGE, "commands")


def _imports(path: str) -> set:
  """Every module name a file imports (`from a.b import c` gives a.b and a.b.c)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _python_files(root: str):
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def test_no_library_module_imports_a_command():
  library = [p for p in _python_files(PACKAGE) if not p.startswith(COMMANDS + os.sep)]
  assert len(library) > 20
  offending = {os.path.relpath(p, PACKAGE): sorted(n for n in _imports(p)
                                                   if n.startswith("simflow_jax.commands"))
               for p in library}
  assert not {p: n for p, n in offending.items() if n}


def test_no_command_imports_another():
  for path in _python_files(COMMANDS):
    rel = os.path.relpath(path, COMMANDS)
    own = "simflow_jax.commands." + rel.split(os.sep)[0].removesuffix(".py")
    others = sorted(n for n in _imports(path) if n.startswith("simflow_jax.commands.")
                    and n != own and not n.startswith(own + "."))
    assert not others, (rel, others)


@pytest.fixture()
def counted(monkeypatch):
  calls = []
  real = build.validate_config
  monkeypatch.setattr(build, "validate_config", lambda config: calls.append(1) or real(config))
  return calls


def _run(tiny_trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_trained, workdir)
  return workdir


@pytest.mark.slow
def test_each_command_validates_its_config_once(counted, tiny_trained, tmp_path, monkeypatch):
  config = tiny.get_config()
  with config.unlocked():
    config.evals = base.ml_collections.ConfigDict(
        {"bpd": base.evaluator("likelihood", num_examples=8)})
  workdir = _run(tiny_trained, tmp_path)
  for name, command in (("train", train), ("sample", sample), ("evaluate", evaluate),
                        ("likelihood", likelihood)):
    counted.clear()
    command.run(config, workdir)  # train: the finished run resumes at its last step
    assert len(counted) == 1, name

  class Priced(Exception):
    pass

  def analyze(*args, **kwargs):
    raise Priced
  monkeypatch.setattr(dry_run.step_cost, "analyze", analyze)
  counted.clear()
  with pytest.raises(Priced):
    dry_run.run(config, str(tmp_path / "price"))
  assert len(counted) == 1
