"""The four converters (scripts/convert_{tarflow,inception,dinov2,lpips}.py) on a bad input file:
a missing file, a file that is not a state dict (a pickled list, a dict without tensors),
another model's state dict, a garbage file. Each is one `Error:` line on stderr naming the file
and what was expected, exit 2, no traceback. Every case runs the script's `__main__` path
(torch_files.run_cli around its main) in-process; a real subprocess checks the command line
itself (convert_tarflow.py in the default run, the others marked slow)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from simflow_jax.pretrained import torch_files

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("tarflow", "inception", "dinov2", "lpips")
# What each converter's message says it expected (a word of its WHAT text).
EXPECTED = {"tarflow": "ml-tarflow", "inception": "Inception", "dinov2": "DINOv2", "lpips": "vgg16"}


def _script(name):
  spec = importlib.util.spec_from_file_location(f"convert_{name}",
                                                os.path.join(ROOT, "scripts", f"convert_{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _argv(name, path, out):
  if name == "dinov2":
    return ["--input", path, "--output", out]
  if name == "lpips":
    return ["--out", out, "--vgg_pth", path, "--lin_pth", path]
  return ["--pth", path, "--out", out]


def _bad_files(tmp_path) -> dict:
  files = {"missing": str(tmp_path / "absent.pth")}
  files["list"] = str(tmp_path / "list.pth")
  torch.save([1, 2, 3], files["list"])
  files["no_tensors"] = str(tmp_path / "no_tensors.pth")
  torch.save({"epoch": 3, "note": "not weights"}, files["no_tensors"])
  files["garbage"] = str(tmp_path / "garbage.pth")
  with open(files["garbage"], "wb") as fh:
    fh.write(np.random.default_rng(0).bytes(4096))
  files["other_model"] = str(tmp_path / "resnet.pth")
  torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10),
              "layer1.0.bn1.running_mean": torch.zeros(8)}, files["other_model"])
  return files


CASES = ("missing", "list", "no_tensors", "garbage", "other_model")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_is_one_line(name, tmp_path, capsys):
  script = _script(name)
  out = str(tmp_path / "out.msgpack")
  for case, path in _bad_files(tmp_path).items():
    with pytest.raises(SystemExit) as info:
      torch_files.run_cli(script.main, _argv(name, path, out))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and path in lines[0], (case, err)
    if case != "other_model":  # the model's own check names what it expected in its words
      assert EXPECTED[name] in lines[0], (case, err)
    assert not os.path.exists(out), case


def test_other_model_names_the_expected_keys(tmp_path, capsys):
  """Another model's state dict: the message says what the converter looked for."""
  path = _bad_files(tmp_path)["other_model"]
  words = {"tarflow": "blocks.0.proj_in.weight", "inception": "InceptionV3",
           "dinov2": "Not a DINOv2 state dict", "lpips": "vgg16"}
  for name in SCRIPTS:
    with pytest.raises(SystemExit):
      torch_files.run_cli(_script(name).main, _argv(name, path, str(tmp_path / "o.msgpack")))
    assert words[name] in capsys.readouterr().err, name


def test_unwritable_output_is_one_line(tmp_path, capsys):
  """A good conversion whose --out cannot be written: the file-system error as one line."""
  (tmp_path / "a_file").write_text("x")
  path = str(tmp_path / "a_file" / "out.msgpack")  # under a regular file: ENOTDIR as root too
  with pytest.raises(SystemExit) as info:
    torch_files.run_cli(lambda argv: open(path, "wb"), [])
  err = capsys.readouterr().err
  assert info.value.code == 2 and err.startswith("Error: ") and "a_file" in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
  def buggy(argv):
    raise ZeroDivisionError("a bug")
  with pytest.raises(ZeroDivisionError):
    torch_files.run_cli(buggy, [])


@pytest.mark.parametrize("name", [SCRIPTS[0], *(pytest.param(n, marks=pytest.mark.slow)
                                                for n in SCRIPTS[1:])])
def test_command_line(name, tmp_path):
  path = _bad_files(tmp_path)["list"]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"convert_{name}.py"),
                         *_argv(name, path, str(tmp_path / "o.msgpack"))],
                        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"Error: {path} holds a list, not a state dict (a dict of tensors); expected "
      f"{_script(name).WHAT if name != 'lpips' else _script(name).VGG_WHAT}."]
