"""Atomic file output, to local folders or object stores (gs:// through etils.epath), and the
one-line account of a file-system error (not a directory, no permission, read-only, disk full)."""
import errno
import os
import re
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


# errno -> what to do; the OSErrors a user meets at the edges (a bad --workdir, a full disk).
_ADVICE = {
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path or move "
                   "the file",
    errno.EEXIST: "a file is in the way where a directory is needed: choose another path or move "
                  "the file",
    errno.EISDIR: "this is a directory where a file is needed: give the path of a file",
    errno.EACCES: "no permission to write here: choose a path you can write (--workdir) or fix its "
                  "permissions",
    errno.EPERM: "the operation is not permitted here: choose a path you can write (--workdir)",
    errno.EROFS: "the file system is read-only: choose a path on a writable disk (--workdir)",
    errno.ENOSPC: "no space left on the device: free space or choose a path on another disk "
                  "(--workdir); what was written before is kept, rerun to resume",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose a path on another disk "
                  "(--workdir); what was written before is kept, rerun to resume",
}
USER_ERRNOS = frozenset(_ADVICE)


class UnwritableDirError(OSError):
  """A folder a run must write to cannot be written; its message says why and what to do."""


def describe_os_error(e: OSError, path=None) -> str:
  """One line: the path, the system's reason and what to do, for an OSError of USER_ERRNOS."""
  where = path if path is not None else (e.filename or "?")
  reason = e.strerror or str(e)
  advice = _ADVICE.get(e.errno, "check the path")
  return f"{where}: {reason} ({advice})."


def describe_tensorstore_error(e: BaseException):
  """The one line for a tensorstore (orbax checkpoint) write that failed with an errno of
  USER_ERRNOS, or None: tensorstore raises ValueError('RESOURCE_EXHAUSTED: Error writing local
  file "PATH" ... [os_error_code='28']'). The path is shortened to the folder holding the
  unfinished *.orbax-checkpoint-tmp step (orbax renames a step into place only once it is
  complete, so the steps saved before are intact)."""
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code is None or int(code.group(1)) not in USER_ERRNOS:
    return None
  number = int(code.group(1))
  found = re.search(r'local file "([^"]+)"', text)
  path = found.group(1) if found else "a checkpoint"
  if ".orbax-checkpoint-tmp" in path:
    path = os.path.dirname(path.split(".orbax-checkpoint-tmp")[0])
  return f"{path}: {os.strerror(number)} ({_ADVICE[number]})."


def check_writable_dir(path) -> None:
  """Creates the folder `path` (and its parents), writes and removes a probe file in it, and
  removes the folders it created, so a run fails at once with an UnwritableDirError naming the
  path, not after its first hours, and a run refused later leaves no trace.
  Object-store paths (gs://...) are left to the store: nothing is probed there."""
  if not is_local(path):
    return
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UnwritableDirError(f"{path} is a file, not a directory: choose another --workdir or move "
                             "the file.")
  created = []  # the folders made here, removed again after the probe: a check writes nothing
  head = path
  while not os.path.exists(head) and os.path.dirname(head) != head:
    created.append(head)
    head = os.path.dirname(head)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe_")
    try:
      os.write(fd, b"simflow-jax write probe\n")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.remove(probe)
    for folder in created:
      try:
        os.rmdir(folder)
      except OSError:
        break  # something else wrote there meanwhile: leave it
  except OSError as e:
    if e.errno == errno.ENOENT:  # a parent that cannot hold folders (/proc, a vanished mount)
      raise UnwritableDirError(f"Cannot create the folder {path}: {e.strerror} ({e.filename}); "
                               "choose another --workdir.") from e
    if e.errno not in USER_ERRNOS:
      raise
    raise UnwritableDirError(f"Cannot write the folder {describe_os_error(e, e.filename or path)}") from e
