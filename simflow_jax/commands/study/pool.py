"""study.workers > 1: the jobs of a phase (__init__.py) run in spawned worker processes, each
taking the next unit when it is free. A unit is one job: the stage-1 VAEs are trained in the
phase before the rows that freeze them, so no two workers ever train or wait on the same VAE.

Each worker's XLA_FLAGS get config.study.worker_xla_flags (default: single-threaded XLA CPU,
so N workers on N cores do not fight over each other's thread pools). SIGINT / SIGTERM to the
parent: each worker gets one SIGTERM, saves its training checkpoint and stops; rerunning the
command resumes.
"""
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback

import jax
from absl import logging

from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.errors import Interrupted


def units_of(jobs: list, todo: list) -> list:
  """The units of `todo` (job indices), in the order given: one job each."""
  del jobs
  return [[i] for i in todo]


def _worker(config, workdir, cache, parent_pid, tasks, results) -> None:
  """A worker process: runs units from `tasks` until it reads None (or its parent is gone);
  reports ('done', unit, [(i, result, seconds)]), ('interrupted', unit, None) or
  ('error', unit, (exception, traceback text))."""
  os.setpgrp()  # a Ctrl-C at the terminal reaches the parent only; it forwards one SIGTERM
  logging.set_verbosity(logging.INFO)
  jax.config.update("jax_compilation_cache_dir", cache[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", cache[1])
  jobs = plan_lib.plan(config, workdir)
  while os.getppid() == parent_pid:
    unit = tasks.get()
    if unit is None:
      return
    try:
      done = []
      for i in unit:
        t0 = time.time()
        done.append((i, job_lib.run_job(jobs[i]), time.time() - t0))
    except Interrupted:
      results.put(("interrupted", unit, None))
      return
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which re-raises it
      try:
        pickle.dumps(e)
      except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
        e = RuntimeError(f"{type(e).__name__}: {e}")
      results.put(("error", unit, (e, traceback.format_exc())))
      return
    results.put(("done", unit, done))


def _start(procs, extra_xla_flags: str) -> None:
  """Starts the workers with extra_xla_flags added to XLA_FLAGS (each worker's jax reads
  them when it starts); this process's environment is left as it was."""
  env_flags = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (env_flags, extra_xla_flags)))
  try:
    for p in procs:
      p.start()
  finally:
    if env_flags is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = env_flags


def run_parallel(config, workdir, units, workers, progress) -> None:
  """Runs `units` in `workers` spawned processes (each takes the next unit when it is free).
  SIGINT / SIGTERM to this process: the workers get one SIGTERM, save their training
  checkpoints and stop; then errors.Interrupted is raised (rerun to resume). A worker's error
  stops the others the same way and is raised here."""
  ctx = multiprocessing.get_context("spawn")
  tasks, results = ctx.Queue(), ctx.Queue()
  for unit in units:
    tasks.put(unit)
  for _ in range(workers):
    tasks.put(None)
  cache = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  procs = [ctx.Process(target=_worker, name=f"study-worker-{k}",
                       args=(config, workdir, cache, os.getpid(), tasks, results))
           for k in range(workers)]
  stop = []

  def stop_workers(signum=None, frame=None):
    if signum is not None:
      stop.append(signum)
    for p in procs:
      if p.is_alive():
        os.kill(p.pid, signal.SIGTERM)

  main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, stop_workers) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
  failure = None
  try:
    _start(procs, str(config.study.worker_xla_flags))
    pending = len(units)
    while pending:
      try:
        kind, unit, payload = results.get(timeout=2.0)
      except queue.Empty:
        if not any(p.is_alive() for p in procs):
          break
        continue
      pending -= 1
      if kind == "done":
        for i, result, seconds in payload:
          progress.record(i, result, False, seconds)
      elif kind == "error" and failure is None:
        failure = payload
        logging.error("A study worker failed on %s:\n%s",
                      [progress.jobs[i]["row"].name for i in unit], payload[1])
        stop_workers()
  finally:
    for p in procs:
      if p.pid is not None:  # started
        p.join()
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stop:
    raise Interrupted(f"The study stopped on {signal.Signals(stop[0]).name}: the workers "
                            "saved their training checkpoints; rerun the same command to resume.",
                            stop[0])
  if failure is not None:
    raise failure[0]
  if pending:
    raise plan_lib.StudyError(f"The study's worker processes ended with {pending} unit(s) unreported (exit "
                     f"codes {[p.exitcode for p in procs]}; e.g. killed for memory): rerun the same "
                     "command to resume, or set config.study.workers=1.")
