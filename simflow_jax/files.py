"""Atomic file output, to local folders or object stores (gs:// through etils.epath)."""
import os
import shutil
import tempfile
from typing import Callable, TypeVar

from etils import epath

T = TypeVar("T")


def is_local(path) -> bool:
  return "://" not in str(path)


def file_mode() -> int:
  """The mode a plainly created file gets (0o666 less the umask); temporary files are 0o600."""
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomic(dest: epath.Path, write: Callable[[str], T]) -> T:
  """Makes `dest` appear complete or not at all: write(tmp) to a temporary local file with
  dest's suffix, then rename it onto dest (local folders) or upload it (gs:// and other
  object stores publish an object only once its upload is complete). Returns write's result."""
  if is_local(dest):
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=dest.suffix)
    os.close(fd)
    try:
      out = write(tmp)
      os.chmod(tmp, file_mode())
      os.replace(tmp, dest)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return out
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="simflow_sample_") as folder:
    tmp = os.path.join(folder, dest.name)
    out = write(tmp)
    with open(tmp, "rb") as src, dest.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
  return out
