"""Runs a per-file job over many files on all cores, for the owner-side folder commands.

`run_chunks(fn, items, state, jobs=...)` splits `items` into consecutive chunks and calls
`fn(state, chunk)` for each, in worker processes (or in this process when one worker is
enough). `fn` returns `(results, error)`: the results of the chunk's items done so far,
and `None` or a `ChunkError` for the first item that failed, after which it stops. The
caller sees every result through `on_results` as soon as its chunk is done (in completion
order), so a failure or an interrupt still leaves it an exact record of what was done.

Pools:

* "process" (default where it is safe): a `fork`ed process pool. Workers inherit `state`
  (keys included) from this process; nothing is pickled but the chunks and their results.
  Decoding and encoding images is mostly Python and C code that holds the GIL for small
  images, so only processes use several cores for folders of small files.
* "thread": a thread pool, used where `fork` is not available (Windows, macOS) or not
  safe: when JAX, TensorFlow or PyTorch are already loaded in this process (they run
  threads that a fork would copy in an undefined state). Set `ETCJAX_POOL=thread` (or
  `process`) to choose.

On the first error, chunks not yet started are cancelled and running ones finish, so
every result reported is a complete output. Ctrl-C does the same (workers ignore SIGINT
and finish their chunk), then re-raises KeyboardInterrupt.

A progress bar (files done, files/s, ETA; tqdm) appears on stderr after a second when
both stdout and stderr are terminals.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from etcjax.errors import UserError

POOL_ENV = "ETCJAX_POOL"
POOLS = ("process", "thread")
# Modules whose threads make fork() unsafe once they are loaded.
_FORK_UNSAFE_MODULES = ("jax", "tensorflow", "torch")
# A chunk is at most this many items: big enough that a task's inter-process overhead
# (~0.1 ms) is small against its work, small enough to balance load and stop quickly.
MAX_CHUNK = 64
# Fewer items than this per worker are not worth starting a worker for.
MIN_ITEMS_PER_WORKER = 32


@dataclass(frozen=True)
class ChunkError:
  """The first failure in a chunk: the item's index in `items` and a one-line message."""
  index: int
  message: str


def usable_cpus() -> int:
  """CPUs this process may run on (its affinity mask), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):
    return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | None) -> int:
  """`--jobs` as a worker count: None or 0 means every usable CPU; negative is an error."""
  if jobs is None or jobs == 0:
    return usable_cpus()
  if jobs < 0:
    raise UserError(f"--jobs must be >= 0 (0: all {usable_cpus()} CPUs), got {jobs}")
  return jobs


def pool_kind() -> str:
  """"process" or "thread": `ETCJAX_POOL` if set, else process where fork is safe."""
  env = os.environ.get(POOL_ENV, "").strip().lower()
  if env:
    if env not in POOLS:
      raise UserError(f"{POOL_ENV}={env!r}: choose one of {', '.join(POOLS)}")
    if env == "process" and not _fork_available():
      raise UserError(f"{POOL_ENV}=process: fork() is not available on this platform")
    return env
  if _fork_available() and not any(m in sys.modules for m in _FORK_UNSAFE_MODULES):
    return "process"
  return "thread"


def _fork_available() -> bool:
  import multiprocessing

  return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def chunk_size(num_items: int, workers: int) -> int:
  """Items per chunk: about 8 chunks per worker, at most MAX_CHUNK."""
  return max(1, min(MAX_CHUNK, -(-num_items // (8 * workers))))


# The state of the running job, inherited by forked workers (never pickled).
_STATE: Any = None


def _worker_init() -> None:
  # The parent handles Ctrl-C: it cancels what has not started and lets workers finish.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(fn: Callable, start: int, chunk: Sequence, state: Any = None) -> tuple[list, Any]:
  results, error = fn(_STATE if state is None else state, chunk)
  if error is not None:
    error = ChunkError(start + error.index, error.message)
  return results, error


def run_chunks(fn: Callable[[Any, Sequence], tuple[list, ChunkError | None]],
               items: Sequence, state: Any, *, jobs: int | None = None,
               on_results: Callable[[list], None] | None = None,
               desc: str = "", unit: str = "img", progress: bool = True
               ) -> ChunkError | None:
  """Runs `fn(state, chunk)` over consecutive chunks of `items` in parallel.

  Args:
    fn: a module-level function (workers look it up by name). Gets `state` and a list of
      items; returns `(results, error)` where `error` is None or a `ChunkError` whose index
      is relative to the chunk; it stops at its first failing item.
    items: the work, in order.
    state: what every call needs (keys, options, caches); inherited by forked workers.
    jobs: worker count; None or 0: every usable CPU. Small inputs use fewer workers, and
      one worker runs in this process.
    on_results: called in this process with each chunk's results as they arrive.
    desc, unit, progress: progress bar label and unit; progress=False: no bar.

  Returns:
    The failure with the lowest index among the chunks that ran, or None. After a failure,
    chunks not yet started are skipped; results of all chunks that ran were reported.
  """
  global _STATE
  n = len(items)
  workers = max(1, min(resolve_jobs(jobs), -(-n // MIN_ITEMS_PER_WORKER)))
  size = chunk_size(n, workers)
  starts = range(0, n, size)
  first: ChunkError | None = None

  def report(results: list, error: ChunkError | None, bar) -> None:
    nonlocal first
    if results and on_results is not None:
      on_results(results)
    if bar is not None:
      bar.update(len(results))
    if error is not None and (first is None or error.index < first.index):
      first = error

  if workers == 1:
    with _progress(n, desc, unit, progress) as bar:
      for s in starts:
        report(*_call(fn, s, items[s:s + size], state), bar)
        if first is not None:
          break
    return first

  import concurrent.futures as cf

  kind = pool_kind()
  sys.stdout.flush()
  sys.stderr.flush()  # forked children would flush copies of unwritten output
  if kind == "process":
    import multiprocessing

    _STATE = state
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                  initializer=_worker_init)
  else:
    pool = cf.ThreadPoolExecutor(workers)
  try:
    futures = [pool.submit(_call, fn, s, items[s:s + size], state if kind == "thread" else None)
               for s in starts]
    reported = set()
    with _progress(n, desc, unit, progress) as bar:
      try:
        for fut in cf.as_completed(futures):
          if fut.cancelled():
            continue
          reported.add(fut)
          report(*fut.result(), bar)
          if first is not None:
            for f in futures:
              f.cancel()
      except BaseException:
        for f in futures:
          f.cancel()
        # Let running chunks finish and report them: their outputs exist.
        for fut in futures:
          if fut not in reported and not fut.cancelled():
            try:
              report(*fut.result(), None)
            except Exception:  # already failing; keep what finished
              continue
        raise
  except cf.process.BrokenProcessPool:
    raise UserError("a worker process died (out of memory?); rerun with --jobs 1 or fewer "
                    "jobs") from None
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    _STATE = None
  return first


class _NoBar:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _progress(total: int, desc: str, unit: str, show: bool = True):
  """A tqdm bar on stderr when stdout and stderr are terminals (shown after 1 s), else none."""
  if not (show and sys.stderr.isatty() and sys.stdout.isatty()) or total < 2:
    return _NoBar()
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit=unit, delay=1.0, file=sys.stderr,
              dynamic_ncols=True, smoothing=0.1)
