"""Test-session set-up shared by every test module."""


def pytest_configure(config):
  del config
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
