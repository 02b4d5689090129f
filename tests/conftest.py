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
