"""Host memory for XLA:CPU: glibc's malloc keeps the memory it frees.

XLA:CPU allocates a compiled program's temporary buffer afresh on every call (3.2 GB for
one `tarflow256` train step at batch 32, benchmarks/common.py). glibc serves an allocation
that large with a new mmap and unmaps it when it is freed, so every step faults its whole
temporary memory in again. With three glibc tunables, freed memory stays in the process
and the next step reuses it:

  glibc.malloc.arena_max=1           one malloc arena: every thread allocates from the main
                                     heap (other arenas are capped at 64 MiB and mmap the rest)
  glibc.malloc.mmap_max=0            no allocation gets its own mapping
  glibc.malloc.trim_threshold=2**40  free memory at the top of the heap is never returned

Without them, every CPU train step returns its large temporary buffers to the kernel and
faults them back in page by page on the next step (docs/performance.md has the numbers).
The price: the process keeps its peak memory until it exits.

Only where it helps: the CPU backend. On a TPU or GPU host the parameters, activations and
XLA's temporary buffers live in accelerator memory; host malloc serves the input pipeline
(grain workers decoding images in many threads, where one arena serialises them) and
checkpoint I/O, and keeping every freed byte would only pin host memory. So the decision
(`cpu_backend`, made before JAX is imported, from the environment and the machine):
  JAX_PLATFORMS (or JAX_PLATFORM_NAME) set: re-execute only when its first platform is cpu;
  otherwise: not where the host has accelerator device nodes (/dev/accel*, /dev/vfio: TPU;
  /dev/nvidia*: NVIDIA; /dev/kfd: AMD) or the TPU runtime (libtpu) is installed; else yes.
Processes started from main.py (grain's data-loader workers) inherit the environment:
on TPU/GPU hosts main.py never sets GLIBC_TUNABLES, so they run with glibc's defaults.

glibc reads tunables only when a process starts, so main.py and the benchmark scripts
re-execute themselves once with these added to GLIBC_TUNABLES (`reexec_keeping_memory`,
called before JAX is imported). Nothing happens except on Linux with glibc 2.26 or newer
(the first with these tunables) and where GLIBC_TUNABLES names no `glibc.malloc.`
tunable: setting one yourself (e.g. GLIBC_TUNABLES=glibc.malloc.arena_max=8) leaves
malloc as you set it, and a re-executed process never re-executes again. This module must
not import JAX.
"""
import glob
import importlib.util
import os
import platform
import sys

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def _glibc_version() -> tuple[int, ...]:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return ()
  return tuple(int(p) for p in version.split(".") if p.isdigit())


_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd")


def accelerators() -> tuple[str, ...]:
  """This machine's accelerator device nodes, and 'libtpu' where the TPU runtime is installed."""
  found = tuple(path for pattern in _ACCELERATOR_NODES for path in sorted(glob.glob(pattern)))
  return found + (("libtpu",) if importlib.util.find_spec("libtpu") is not None else ())


def cpu_backend(environ, accelerator: tuple[str, ...] | None = None) -> bool:
  """Whether JAX will run on the CPU backend (the module docstring's rule; without JAX)."""
  platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not (accelerators() if accelerator is None else accelerator)


def keep_memory_environ(environ, system: str | None = None, glibc: tuple[int, ...] | None = None,
                        accelerator: tuple[str, ...] | None = None) -> dict | None:
  """The environment to re-execute with (a copy of `environ` with TUNABLES appended to
  GLIBC_TUNABLES), or None where that would change nothing, JAX will not run on the CPU
  (cpu_backend) or the user set malloc's tunables (see the module docstring). system, glibc
  and accelerator default to this machine's."""
  system = sys.platform if system is None else system
  glibc = _glibc_version() if glibc is None else glibc
  tunables = environ.get("GLIBC_TUNABLES", "")
  if not system.startswith("linux") or glibc < (2, 26) or "glibc.malloc." in tunables:
    return None
  if not cpu_backend(environ, accelerator):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLES}" if tunables else TUNABLES
  return env


def reexec_keeping_memory() -> None:
  """Replaces this process by the same command with TUNABLES set (same pid, arguments and
  interpreter options), or returns where that would change nothing."""
  env = keep_memory_environ(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
