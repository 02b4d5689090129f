"""Up-front memory checks: a request whose KV cache cannot fit is refused before anything is allocated.

The cache's size is exact: `jax.eval_shape` of the policy's own `init` (keys, values, positions, scores and the
policy's state), so every policy is covered without a formula per policy. The memory available is the device's
free memory (`memory_stats()` on accelerators) or, on CPU, the host's MemAvailable; `LACAX_MEMORY_LIMIT_BYTES`
overrides both (to rehearse a smaller machine).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import jax
import numpy as np

from lacax.errors import ResourceError, format_bytes

LIMIT_ENV = "LACAX_MEMORY_LIMIT_BYTES"


def available_bytes(device: jax.Device | None = None) -> int | None:
  """Free memory of `device` (default the first local device) in bytes, or None when it cannot be told."""
  if os.environ.get(LIMIT_ENV):
    return int(os.environ[LIMIT_ENV])
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without memory_stats)
      stats = {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None
  free = _proc_kib_field("/proc/meminfo", "MemAvailable")
  if free is not None:
    return free
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def _proc_kib_field(path: str, name: str) -> int | None:
  """Bytes of the "<name>: <n> kB" line of a /proc file (meminfo, smaps_rollup), or None."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(name + ":"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def anon_huge_page_bytes() -> int | None:
  """This process's anonymous memory on transparent huge pages (Linux's AnonHugePages), or None."""
  return _proc_kib_field("/proc/self/smaps_rollup", "AnonHugePages")


def cache_bytes(policy, cfg, batch: int, capacity: int) -> int:
  """Bytes of `policy.init(cfg, batch, capacity)`, computed without allocating it."""
  shapes = jax.eval_shape(lambda: policy.init(cfg, batch, capacity))
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


def require_cache_fits(policy, cfg, batch: int, capacity: int, *, copies: int = 1, what: str = "the request",
                       device: jax.Device | None = None) -> int:
  """Raises `ResourceError` (with the bytes needed and available) when `copies` caches of `capacity` slots for
  `batch` rows cannot fit in the device's free memory. Returns the bytes one cache needs."""
  need = cache_bytes(policy, cfg, batch, capacity)
  have = available_bytes(device)
  if have is not None and need * copies > have:
    raise ResourceError(
        f"{what} needs a KV cache of {need * copies} bytes ({format_bytes(need * copies)}: {copies} x batch {batch}"
        f" x {capacity} slots x {cfg.num_layers} layers x {cfg.num_kv_heads} kv heads x {cfg.head_dim} dims, "
        f"{cfg.dtype}) but only {have} bytes ({format_bytes(have)}) are free; lower the batch, the budget or "
        "the length", needed=need * copies, available=have)
  return need


# glibc's malloc backs its large (mmap-ed) blocks with transparent huge pages under this tunable (glibc >= 2.35,
# with the kernel's THP mode "madvise" or "always"). XLA:CPU allocates every execution's temporaries afresh, and
# a training step of SmolLM2-135M touches about a GiB of them: with 4 KiB pages that is ~2M page faults per run
# of a few steps, and the step takes 1.6 s instead of 1.25 s (LoRA, bfloat16 products, AMD Zen 4; the
# `experiments.bench_train` note). The tunable is read when a process starts, so it is set for a new process.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of `env` (default os.environ) whose GLIBC_TUNABLES also holds `HUGEPAGE_TUNABLE`."""
  env = dict(os.environ if env is None else env)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
  env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGEPAGE_TUNABLE])
  return env


def malloc_hugepages() -> bool:
  """Whether this process was started with `HUGEPAGE_TUNABLE`."""
  return HUGEPAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def _thp_mode() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      text = f.read()
  except OSError:
    return ""
  return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def _glibc_at_least(major: int, minor: int) -> bool:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    got = tuple(int(v) for v in version.split(".")[:2])
  except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS)
    return False
  return name == "glibc" and got >= (major, minor)


def reexec_with_hugepages(argv: list[str]) -> None:
  """Restarts this process as `python *argv` with `HUGEPAGE_TUNABLE` set, where it would help and is not set.

  It helps on Linux with glibc >= 2.35 and the kernel's THP mode "madvise" (under "always" huge pages come
  anyway; under "never" not at all). `LACAX_HUGEPAGES=0` turns it off. The process id stays the same (exec), so
  signals and supervisors see one process. Returns only when it does not restart.
  """
  if os.environ.get("LACAX_HUGEPAGES", "1") == "0" or malloc_hugepages():
    return
  if _thp_mode() != "madvise" or not _glibc_at_least(2, 35):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv], hugepage_env())


# --- huge pages for arrays that already exist (the weights a decode step streams) -----------------------------

HUGE_PAGE_BYTES = 2 << 20  # x86-64's transparent huge page
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h (MADV_COLLAPSE: Linux 6.1)


def back_with_huge_pages(tree, *, min_bytes: int = 4 << 20) -> int:
  """Asks Linux to back the large CPU arrays of `tree` with 2 MiB transparent huge pages, in place.

  A decode step streams every weight once, and reads the whole KV cache (`lacax.generate` backs the decode
  cache this way after the prefill). With 4 KiB pages that is a TLB miss, and a restart of the hardware
  prefetchers (which stop at page boundaries), every 4 KiB; with 2 MiB pages, one per 2 MiB. XLA's allocator
  maps its buffers with 4 KiB pages, and on hosts whose transparent huge pages are `madvise`-only (the common
  default) nothing changes that (`reexec_with_hugepages` sets glibc's tunable for a new process's malloc,
  which the launcher uses; this works on arrays that already exist, in any process). For each array of at least `min_bytes` on a CPU device this calls
  madvise(MADV_HUGEPAGE) and madvise(MADV_COLLAPSE) on the 2 MiB-aligned part of its buffer: the kernel copies
  those pages into huge pages (the values and the address stay the same; the array's owner is untouched).
  Measured on a 2-core Zen 4 host, SmolLM2-135M decode at 512 tokens, interleaved pairs in one process with the
  same tokens: bfloat16 1.026x and 1.035x the tokens/s (medians of two runs of 8 pairs), float32 1.034x (6
  pairs). `experiments/bench_decode.py` records the bytes each row had on huge pages.

  Returns the bytes collapsed: 0 off Linux, off CPU, before Linux 6.1, where transparent huge pages are off
  (`never`), or with `LACAX_HUGEPAGES=0` (the switch of `reexec_with_hugepages` too). Collapsing is best effort (the kernel refuses a range when it finds
  no free huge pages); nothing fails: a refused range is left as it was.
  """
  if os.environ.get("LACAX_HUGEPAGES", "1") == "0" or platform.system() != "Linux" or _thp_mode() == "never":
    return 0
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
  except (OSError, AttributeError):
    return 0
  madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  madvise.restype = ctypes.c_int
  done = 0
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array) or leaf.nbytes < min_bytes or not leaf.is_fully_addressable:
      continue
    for shard in leaf.addressable_shards:
      if shard.device.platform != "cpu":
        continue
      try:
        start = shard.data.unsafe_buffer_pointer()
      except Exception:  # pylint: disable=broad-except  # a buffer without a host pointer
        continue
      begin = (start + HUGE_PAGE_BYTES - 1) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
      end = (start + shard.data.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
      if end <= begin:
        continue
      if madvise(begin, end - begin, _MADV_HUGEPAGE) == 0 and madvise(begin, end - begin, _MADV_COLLAPSE) == 0:
        done += end - begin
  return done
