"""A sandbox for model-written code (Verilog, C++, DSLX, shell): the only way lacax runs it.

Every run happens in a `Box`: a fresh temporary directory, deleted afterwards. Each command in a box:

  - starts its own session and process group (`setsid`); on the wall-clock deadline, or when it floods its
    output, the whole group gets SIGKILL, and so does every process left running under the box's user id;
  - runs under resource limits set in the child before `exec` (`resource.setrlimit`): CPU seconds
    (RLIMIT_CPU, soft then hard), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), process count
    (RLIMIT_NPROC), open files, no core dumps; stdout / stderr are read through pipes and capped;
  - as root (where `unshare(2)` is allowed): runs in a private network namespace (no interface but a downed
    loopback: every connection fails with ENETUNREACH) and a private mount namespace in which `/tmp`,
    `/var/tmp` and `/dev/shm` are the box directory itself, then drops to a user id of its own (61000 + slot,
    claimed with a lock file, so concurrent boxes, even in other processes, never share one). RLIMIT_NPROC
    then counts only the box's processes, files outside the box owned by root are not writable, and leftover
    processes (even ones that escaped the process group with `setsid`) are found by user id and killed.

Documented fallback (not root, or no `unshare`): limits and process-group kill only; the network is not
isolated and the user id is the caller's. `isolation()` says which mode is in force and every `RunResult`
records it, so a result never claims isolation it did not have.

Inside the namespace the box *is* `/tmp` (and the working directory); commands should name the box's files
by relative paths, which work in both modes.

`RunResult.stopped_by` says what ended a run: "wall_time", "cpu_time", "file_size", "output" (a stream passed
`Limits.output_bytes`), "memory" (an allocation refused under RLIMIT_AS), or None when the program exited by
itself; `limits_hit` adds what was refused along the way ("processes": fork failed at RLIMIT_NPROC;
"network": a connection was unreachable; "filesystem": a write was denied), read from the signals and the
program's own error messages.

`parallel_map` runs independent tasks (each opening its own boxes) over the cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

_UID_BASE = 61000
_UID_SLOTS = 1000
# Machine-wide, whatever TMPDIR a process has: two processes that locked different directories could claim the
# same user id, and claiming one kills what a crashed previous owner left running under it.
_LOCK_DIR = "/tmp/lacax-sandbox-locks"
_PRIVATE_DIRS = ("/dev/shm", "/var/tmp", "/tmp")  # /tmp last: the box itself lives under it

STOPS = ("wall_time", "cpu_time", "file_size", "output", "memory")
HITS = STOPS + ("processes", "network", "filesystem")

_PATTERNS = {
    "memory": re.compile(r"MemoryError|bad_alloc|Cannot allocate memory|[Oo]ut of memory|virtual memory exhausted"
                         r"|mmap.*failed|ENOMEM"),
    "processes": re.compile(r"Resource temporarily unavailable|fork: retry|BlockingIOError|[Cc]annot fork|EAGAIN"),
    "network": re.compile(r"Network is unreachable|ENETUNREACH|Cannot assign requested address"
                          r"|Temporary failure in name resolution|Name or service not known"),
    "filesystem": re.compile(r"Permission denied|Read-only file system|EACCES|EROFS"),
}

_libc = ctypes.CDLL(None, use_errno=True)

# With JAX loaded, every fork warns that JAX's threads cannot survive it. The sandbox's child only runs
# `_child_setup` (already-imported modules, libc calls, no locks another thread could hold) and then execs.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed command.

  Attributes:
    wall_s: wall-clock seconds before the process group is killed.
    cpu_s: CPU seconds (RLIMIT_CPU; SIGXCPU at the limit, SIGKILL a second later); None = ceil(wall_s) + 1,
      so that a busy loop is stopped by the wall clock first.
    memory_bytes: address space per process (RLIMIT_AS).
    file_bytes: largest file a process may write (RLIMIT_FSIZE).
    processes: processes of the box's user (RLIMIT_NPROC; counted per box when the user id is dropped).
    open_files: open file descriptors per process (RLIMIT_NOFILE).
    output_bytes: bytes kept of stdout and of stderr each; past it the group is killed ("output").
  """

  wall_s: float = 30.0
  cpu_s: float | None = None
  memory_bytes: int = 4 << 30
  file_bytes: int = 256 << 20
  processes: int = 64
  open_files: int = 256
  output_bytes: int = 1 << 20

  def __post_init__(self):
    for name in ("wall_s", "memory_bytes", "file_bytes", "processes", "open_files", "output_bytes"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"limits.{name}={value!r} must be a positive number")
    if self.cpu_s is not None and self.cpu_s <= 0:
      raise ValueError(f"limits.cpu_s={self.cpu_s!r} must be positive (or None for ceil(wall_s))")

  @property
  def cpu_seconds(self) -> int:
    return max(1, math.ceil(self.cpu_s) if self.cpu_s is not None else math.ceil(self.wall_s) + 1)

  def replace(self, **kw) -> "Limits":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What one sandboxed command did.

  Attributes:
    cmd: the argv.
    returncode: the exit status; -N when killed by signal N.
    stdout, stderr: the captured text (at most `Limits.output_bytes` each, decoded with replacement).
    stdout_truncated, stderr_truncated: whether the stream passed the cap.
    wall_s: wall-clock seconds.
    cpu_s: user + system CPU seconds of the process and its waited-for descendants.
    max_rss_bytes: peak resident set of the largest process (Linux's `ru_maxrss`). It includes the resident set
      the child inherited when it was forked from the calling process, before its exec: called from a process
      of several GB, that is the figure reported even if the sandboxed program itself stayed small.
    stopped_by: the limit that ended the run (one of STOPS), or None when it exited by itself.
    limits_hit: every limit the run ran into (a superset of stopped_by), in HITS order.
    strays_killed: processes still alive after the command ended (background children), killed by the box.
    isolation: the isolation in force (`isolation()`).
  """

  cmd: tuple[str, ...]
  returncode: int
  stdout: str
  stderr: str
  stdout_truncated: bool
  stderr_truncated: bool
  wall_s: float
  cpu_s: float
  max_rss_bytes: int
  stopped_by: str | None
  limits_hit: tuple[str, ...]
  strays_killed: int
  isolation: Mapping[str, Any]

  @property
  def ok(self) -> bool:
    return self.returncode == 0 and self.stopped_by is None

  @property
  def limit(self) -> str | None:
    """The one limit to report: what stopped the run, else the first limit it ran into, else None."""
    return self.stopped_by or (self.limits_hit[0] if self.limits_hit else None)

  def to_json(self, max_chars: int = 4000) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["stdout"], d["stderr"] = self.stdout[-max_chars:], self.stderr[-max_chars:]
    d["isolation"] = dict(self.isolation)
    return d


_ISOLATION: dict[str, Any] | None = None
_ISOLATION_LOCK = threading.Lock()


def _unshare_works() -> bool:
  pid = os.fork()
  if pid == 0:  # the probe child: try, report by exit status, never return into Python
    try:
      ok = _libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) == 0
      ok = ok and _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
    finally:
      os._exit(0 if ok else 1)  # pylint: disable=used-before-assignment
  _, status = os.waitpid(pid, 0)
  return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def isolation() -> dict[str, Any]:
  """The isolation this process can give: {"mode": "namespaces" | "rlimits-only", "network", "user", "tmp"}."""
  global _ISOLATION
  with _ISOLATION_LOCK:
    if _ISOLATION is None:
      full = os.geteuid() == 0 and _unshare_works()
      _ISOLATION = {
          "mode": "namespaces" if full else "rlimits-only",
          "network": "private namespace" if full else "not isolated",
          "user": "dropped to a per-box uid" if full else f"caller's uid {os.geteuid()}",
          "tmp": "private (/tmp, /var/tmp, /dev/shm = the box)" if full else "shared",
      }
    return dict(_ISOLATION)


def _processes_of(uid: int) -> list[int]:
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        for line in f:
          if line.startswith("Uid:"):
            if int(line.split()[1]) == uid:
              pids.append(int(entry))
            break
    except (OSError, ValueError):
      continue
  return pids


def _kill_uid(uid: int) -> int:
  """SIGKILLs every process of `uid` until none is left; returns how many were found alive."""
  seen: set[int] = set()
  deadline = time.monotonic() + 30.0  # a killed process can take a while to vanish on a loaded machine
  while time.monotonic() < deadline:
    pids = _processes_of(uid)
    if not pids:
      break
    for pid in pids:
      seen.add(pid)
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.005)
  return len(seen)


class _UidSlot:
  """A user id claimed for one box with an exclusive lock file (works across processes)."""

  def __init__(self):
    os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
    start = (os.getpid() * 7 + threading.get_ident()) % _UID_SLOTS
    for i in range(_UID_SLOTS):
      slot = (start + i) % _UID_SLOTS
      fd = os.open(os.path.join(_LOCK_DIR, f"uid-{slot}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        continue
      self.fd, self.uid = fd, _UID_BASE + slot
      _kill_uid(self.uid)  # a previous owner that crashed may have left processes behind
      return
    raise RuntimeError(f"no free sandbox uid in {_UID_BASE}..{_UID_BASE + _UID_SLOTS - 1}")

  def release(self):
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _mount_bind(src: str, dst: str):
  if _libc.mount(src.encode(), dst.encode(), None, _MS_BIND, None) != 0:
    raise OSError(ctypes.get_errno(), f"bind-mounting the box over {dst}")


def _child_setup(limits: Limits, namespaces: bool, uid: int | None, box: str):
  """Runs in the forked child before exec: namespaces, limits, then the user id (in that order: unshare and
  mount need root, RLIMIT_NPROC must be set before the uid drop counts against it)."""
  _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  if namespaces:
    if _libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:
      raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
      raise OSError(ctypes.get_errno(), "making / a private mount")
    for d in _PRIVATE_DIRS:
      if os.path.isdir(d):
        _mount_bind(box, d)
    os.chdir("/tmp")  # the box itself now; the old path is hidden under the new mount
  cpu = limits.cpu_seconds
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
  resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  if uid is not None:
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
  else:  # without a uid of its own the count includes the caller's other processes: best effort
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
  _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _reader(stream, cap: int, sink: list, overflow: Callable[[], None]):
  kept, total = bytearray(), 0
  while True:
    chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
    if not chunk:
      break
    total += len(chunk)
    if len(kept) < cap:
      kept += chunk[:cap - len(kept)]
    if total > cap:
      overflow()
      break
  stream.close()
  sink.extend([bytes(kept), total > cap])


class Box:
  """A temporary directory in which sandboxed commands run; a context manager that removes everything.

  Args:
    limits: the default limits of `run`.
    files: {relative path: text or bytes} written before the first command.
    drop_user: run under a uid of the box's own when `isolation()` allows. False keeps the caller's uid (and
      its file permissions) but still the private network and /tmp: for tools that must read the caller's
      private files, e.g. a Python interpreter installed under a 0700 home directory (`lacax.hw.tools.xls`).
  """

  def __init__(self, limits: Limits = Limits(), files: Mapping[str, str | bytes] | None = None,
               drop_user: bool = True):
    self.limits = limits
    self.iso = isolation()
    self.namespaces = self.iso["mode"] == "namespaces"
    self._slot = _UidSlot() if self.namespaces and drop_user else None
    self.uid = self._slot.uid if self._slot else None
    if self.namespaces and not drop_user:
      self.iso = dict(self.iso, user=f"caller's uid {os.geteuid()} (drop_user=False)")
    self.path = tempfile.mkdtemp(prefix="lacax-box-")
    if self.uid is not None:
      os.chown(self.path, self.uid, self.uid)
    self._closed = False
    for name, content in (files or {}).items():
      self.write(name, content)

  def _resolve(self, name: str) -> str:
    if not name or os.path.isabs(name) or ".." in name.split("/"):
      raise ValueError(f"box file name {name!r} must be a relative path without '..'")
    return os.path.join(self.path, name)

  def write(self, name: str, content: str | bytes) -> str:
    """Writes a file into the box (owned by the box's uid); returns its relative name."""
    path = self._resolve(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)
    if self.uid is not None:
      for root, _, _ in os.walk(self.path):
        os.chown(root, self.uid, self.uid)
      os.chown(path, self.uid, self.uid)
    return name

  def copy_in(self, src: str, name: str | None = None) -> str:
    """Copies a file from outside into the box."""
    with open(src, "rb") as f:
      return self.write(name or os.path.basename(src), f.read())

  def read(self, name: str, errors: str = "replace") -> str:
    with open(self._resolve(name), "rb") as f:
      return f.read().decode(errors=errors)

  def exists(self, name: str) -> bool:
    return os.path.exists(self._resolve(name))

  def run(self, cmd: Sequence[str], *, limits: Limits | None = None, stdin: str | bytes | None = None,
          env: Mapping[str, str] | None = None) -> RunResult:
    """Runs `cmd` in the box under `limits` (default: the box's); never raises for what the program does."""
    if self._closed:
      raise RuntimeError(f"box {self.path} is closed")
    limits = limits or self.limits
    cmd = tuple(str(c) for c in cmd)
    home = "/tmp" if self.namespaces else self.path
    run_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home}
    run_env.update(env or {})
    start = time.monotonic()
    try:
      proc = subprocess.Popen(cmd, cwd=self.path, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              close_fds=True, env=run_env,
                              preexec_fn=functools.partial(_child_setup, limits, self.namespaces, self.uid, self.path))
    except (OSError, subprocess.SubprocessError) as e:
      return RunResult(cmd, 127, "", f"sandbox: cannot start {cmd[0]!r}: {e}", False, False,
                       time.monotonic() - start, 0.0, 0, None, (), 0, self.iso)
    flags: dict[str, bool] = {}
    kill_lock = threading.Lock()

    def kill(reason: str):
      with kill_lock:
        flags.setdefault(reason, True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.killpg(proc.pid, signal.SIGKILL)
        if self.uid is not None:
          _kill_uid(self.uid)

    outs: list = []
    errs: list = []
    readers = [threading.Thread(target=_reader, args=(proc.stdout, limits.output_bytes, outs,
                                                      lambda: kill("output")), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, limits.output_bytes, errs,
                                                      lambda: kill("output")), daemon=True)]
    for t in readers:
      t.start()
    if stdin is not None:
      with contextlib.suppress(BrokenPipeError, OSError):
        proc.stdin.write(stdin.encode() if isinstance(stdin, str) else stdin)
        proc.stdin.close()
    timer = threading.Timer(limits.wall_s, lambda: kill("wall_time"))
    timer.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    # Background children outlive the leader: kill the group and everything left under the box's uid.
    strays = 0
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(proc.pid, signal.SIGKILL)
    if self.uid is not None:
      strays = _kill_uid(self.uid)
    for t in readers:
      t.join(timeout=5)
    stdout_b, stdout_trunc = (outs + [b"", False])[:2]
    stderr_b, stderr_trunc = (errs + [b"", False])[:2]
    stdout, stderr = stdout_b.decode(errors="replace"), stderr_b.decode(errors="replace")
    rc = proc.returncode
    cpu = rusage.ru_utime + rusage.ru_stime
    hits = set()
    if flags.get("wall_time"):
      hits.add("wall_time")
    if flags.get("output"):
      hits.add("output")
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and not flags and cpu >= limits.cpu_seconds - 0.05):
      hits.add("cpu_time")
    if rc == -signal.SIGXFSZ or "File size limit exceeded" in stderr:
      hits.add("file_size")
    text = stdout[-20000:] + "\n" + stderr[-20000:]
    for name, pattern in _PATTERNS.items():
      if pattern.search(text):
        hits.add(name)
    stopped = next((s for s in ("output", "cpu_time", "file_size", "wall_time") if s in hits), None)
    if stopped is None and rc != 0 and "memory" in hits:
      stopped = "memory"
    return RunResult(cmd, rc, stdout, stderr, bool(stdout_trunc), bool(stderr_trunc), wall, cpu,
                     rusage.ru_maxrss * 1024, stopped, tuple(h for h in HITS if h in hits), strays, self.iso)

  def close(self):
    if self._closed:
      return
    self._closed = True
    if self.uid is not None:
      _kill_uid(self.uid)
    shutil.rmtree(self.path, ignore_errors=True)
    if self._slot is not None:
      self._slot.release()

  def __enter__(self) -> "Box":
    return self

  def __exit__(self, *exc):
    self.close()


def run(cmd: Sequence[str], files: Mapping[str, str | bytes] | None = None, limits: Limits = Limits(),
        **kw) -> RunResult:
  """One command in a fresh box."""
  with Box(limits, files) as box:
    return box.run(cmd, **kw)


T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
  return max(1, len(os.sched_getaffinity(0)))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
  """`[fn(x) for x in items]` over `workers` threads (default: the usable cores), in order.

  Threads suffice: the work is in the sandboxed child processes, the Python side only waits.
  """
  items = list(items)
  workers = workers or default_workers()
  if workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(fn, items))
