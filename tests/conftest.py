"""Test-session set-up shared by every test module."""

import os
import shutil
import tempfile

_SESSION_ENV = "LACAX_TEST_TMPDIR"
_OWNED = []  # the session directory, in the process that made it


def _one_temporary_directory() -> None:
  """Every temporary file and directory of the session (the tests', the workers', their child processes') goes
  under one directory that is removed when the session ends: a test that leaves a `mkdtemp` behind, or a child
  killed mid-run, no longer litters /tmp. It is world-writable and sticky like /tmp, because sandboxed programs run
  under other user ids inside their box directories there."""
  if os.environ.get(_SESSION_ENV):  # a worker or child of a session that made one
    return
  path = tempfile.mkdtemp(prefix="lacax_test_session_")
  os.chmod(path, 0o1777)
  _OWNED.append(path)
  os.environ[_SESSION_ENV] = os.environ["TMPDIR"] = path
  tempfile.tempdir = path


def _share_one_compilation_cache() -> None:
  """One persistent XLA compilation cache for the whole test session, in its temporary directory: the
  pytest-xdist workers, and every child process a test starts (jobs killed and resumed, notebooks, the 8-device
  sharding child), inherit it through the environment, so a program compiled once (the same tiny model in another
  module, a resumed job, the AOT `lower().compile()` of a program that just ran) is read back instead of compiled
  again. Nothing carries over between runs. A caller's own JAX_COMPILATION_CACHE_DIR is left alone."""
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ[_SESSION_ENV], "xla_cache"))
  # Cache every program, however small or quick to compile: the suite is thousands of small compilations.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _compile_fast() -> None:
  """Unoptimised XLA CPU code: the suite's programs are tiny, so compiling them dominates, and LLVM's passes are
  most of a compilation (a quarter of the suite's time on two cores). A test that compares two computations bit for
  bit runs both through the same flags; a child process that runs SmolLM2 for minutes drops them again
  (LACAX_TEST_FAST_COMPILE_FLAGS names them). XLA_FLAGS that already choose an optimisation level are left
  alone."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_FAST_COMPILE_FLAGS}".strip()
    # What was added, for a child that runs the real model long enough to want the optimised code (notebooks).
    os.environ["LACAX_TEST_FAST_COMPILE_FLAGS"] = _FAST_COMPILE_FLAGS


def pytest_unconfigure(config):
  del config
  while _OWNED:
    shutil.rmtree(_OWNED.pop(), ignore_errors=True)


def pytest_configure(config):
  del config
  _one_temporary_directory()
  _share_one_compilation_cache()
  _compile_fast()
  # PyTorch (the parity reference) and XLA each keep a CPU thread pool; in one process on a 2-core machine
  # torch's spinning workers slow its small per-token ops down ~8x. One torch thread is plenty for the tiny
  # reference computations the tests run.
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_num_threads(1)


def pytest_runtest_teardown(item, nextitem):
  # A pytest-xdist worker runs many modules in one process, and JAX keeps every compiled program alive in its
  # caches: without this a worker grew past 7 GB by the end of the suite. Between modules nothing compiled is
  # shared, so the caches are dropped there (and the garbage they referenced collected).
  import sys  # pylint: disable=g-import-not-at-top

  if nextitem is not None and nextitem.module is item.module:
    return
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  import gc  # pylint: disable=g-import-not-at-top

  gc.collect()
