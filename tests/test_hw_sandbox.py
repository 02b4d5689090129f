"""The sandbox stops runaway model-written programs, says which limit stopped them, and leaves nothing behind."""

import os
import resource
import signal
import tempfile
import time
import uuid
from unittest import mock

from absl.testing import absltest

from lacax.hw import sandbox

_FORK_BOMB = r"""
#include <stdio.h>
#include <unistd.h>
int main() {
  int said = 0;
  for (;;) { if (fork() < 0) { if (!said) perror("fork"); said = 1; usleep(1000); } }
}
"""

_MEMORY = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main() {
  size_t n = 10ull << 30;  /* 10 GB */
  char *p = malloc(n);
  if (!p) { perror("malloc 10 GB"); return 3; }
  memset(p, 1, n);
  return p[n - 1];
}
"""

_NETWORK = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <sys/socket.h>
int main() {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_port = htons(80); inet_pton(AF_INET, "1.1.1.1", &a.sin_addr);
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 2; }
  puts("connected");
  return 0;
}
"""


def _procs_of(uid):
  return sandbox._processes_of(uid)


class SandboxTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.iso = sandbox.isolation()
    # Each test gets its own temporary directory (mode 1777 like /tmp: boxes belong to their own uids), so that
    # what it leaves is its own: tests in another pytest-xdist worker have live boxes of their own meanwhile.
    self.tmp = tempfile.mkdtemp(prefix="lacax_sandbox_test_")
    os.chmod(self.tmp, 0o1777)
    self.enter_context(mock.patch.object(tempfile, "tempdir", self.tmp))

  def tearDown(self):
    # Nothing left by the sandbox: no box directory, nothing owned by a box's user id.
    self.assertEqual(sorted(os.listdir(self.tmp)), [])
    os.rmdir(self.tmp)
    super().tearDown()

  def _compile(self, box, source):
    box.write("prog.c", source)
    res = box.run(["gcc", "-O1", "-o", "prog", "prog.c"])
    self.assertTrue(res.ok, res.stderr)

  def test_isolation_is_full_as_root(self):
    # The CI container runs as root, where namespaces are available: the strong mode must be in force.
    self.assertEqual(os.geteuid(), 0)
    self.assertEqual(self.iso["mode"], "namespaces")

  def test_normal_run(self):
    res = sandbox.run(["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    self.assertEqual((res.returncode, res.stdout, res.stderr), (3, "hello\n", "oops\n"))
    self.assertIsNone(res.stopped_by)
    self.assertEqual(res.limits_hit, ())
    self.assertFalse(res.ok)

  def test_infinite_loop_stopped_by_wall_clock(self):
    t = time.monotonic()
    res = sandbox.run(["sh", "-c", "while :; do :; done"], limits=sandbox.Limits(wall_s=1.0))
    self.assertEqual(res.stopped_by, "wall_time")
    self.assertEqual(res.returncode, -signal.SIGKILL)
    self.assertLess(time.monotonic() - t, 30.0)

  def test_cpu_limit(self):
    res = sandbox.run(["sh", "-c", "while :; do :; done"], limits=sandbox.Limits(wall_s=120.0, cpu_s=1))
    self.assertEqual(res.stopped_by, "cpu_time")
    self.assertGreaterEqual(res.cpu_s, 0.9)

  def test_fork_bomb_is_contained_and_cleaned_up(self):
    with sandbox.Box(sandbox.Limits(wall_s=2.0, processes=32)) as box:
      self._compile(box, _FORK_BOMB)
      uid = box.uid
      res = box.run(["./prog"])
      self.assertEqual(res.stopped_by, "wall_time")
      self.assertIn("processes", res.limits_hit)  # fork() failed with EAGAIN at RLIMIT_NPROC
      self.assertGreater(res.strays_killed, 0)
      self.assertEqual(_procs_of(uid), [])

  def test_background_children_and_setsid_escapes_are_killed(self):
    with sandbox.Box(sandbox.Limits(wall_s=5.0)) as box:
      res = box.run(["sh", "-c", "setsid sleep 1000 & sleep 1000 & echo started"])
      self.assertEqual(res.stdout, "started\n")
      self.assertEqual(res.returncode, 0)
      self.assertEqual(res.strays_killed, 2)
      self.assertEqual(_procs_of(box.uid), [])

  def test_display_flood_stopped_at_output_cap(self):
    flood = "module tb; initial forever $display(\"flood flood flood flood flood\"); endmodule\n"
    with sandbox.Box(sandbox.Limits(wall_s=20.0, output_bytes=1 << 16), {"tb.v": flood}) as box:
      comp = box.run(["iverilog", "-o", "sim", "tb.v"])
      self.assertTrue(comp.ok, comp.stderr)
      res = box.run(["vvp", "-n", "sim"])
    self.assertEqual(res.stopped_by, "output")
    self.assertTrue(res.stdout_truncated)
    self.assertEqual(len(res.stdout.encode()), 1 << 16)
    self.assertLess(res.wall_s, 10.0)

  def test_ten_gigabyte_allocation_refused(self):
    with sandbox.Box(sandbox.Limits(wall_s=10.0, memory_bytes=1 << 30)) as box:
      self._compile(box, _MEMORY)
      res = box.run(["./prog"])
    self.assertEqual(res.stopped_by, "memory")
    self.assertEqual(res.returncode, 3)
    # ru_maxrss counts what the child inherited at fork from this (test) process, so bound it by that too.
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    self.assertLess(res.max_rss_bytes, max(1 << 30, inherited + (64 << 20)))

  def test_file_size_limit(self):
    res = sandbox.run(["sh", "-c", "head -c 10000000 /dev/zero > big"], limits=sandbox.Limits(file_bytes=1 << 20))
    self.assertEqual(res.stopped_by, "file_size")

  def test_write_outside_the_box_is_denied_or_contained(self):
    here = os.path.dirname(os.path.abspath(__file__))  # root-owned, not world-writable
    name = f"lacax-escape-{uuid.uuid4().hex}"
    targets = [os.path.join(here, name), f"/etc/{name}"]
    res = sandbox.run(["sh", "-c", "; ".join(f"echo x > {t}" for t in targets)
                       + f"; echo y > /tmp/{name}; echo z > /var/tmp/{name}; ls"])
    self.assertIn("filesystem", res.limits_hit)
    self.assertEqual(res.stderr.count("Permission denied"), 2)
    for t in targets + [f"/tmp/{name}", f"/var/tmp/{name}"]:
      self.assertFalse(os.path.exists(t), t)
    self.assertIn(name, res.stdout.split())  # /tmp and /var/tmp inside are the box itself, which is gone

  def test_network_is_unreachable(self):
    with sandbox.Box(sandbox.Limits(wall_s=10.0)) as box:
      self._compile(box, _NETWORK)
      res = box.run(["./prog"])
    self.assertEqual(res.returncode, 2)
    self.assertIn("network", res.limits_hit)
    self.assertNotIn("connected", res.stdout)

  def test_box_directory_removed_and_paths_validated(self):
    box = sandbox.Box()
    path = box.path
    box.write("a/b.txt", "hi")
    self.assertEqual(box.read("a/b.txt"), "hi")
    with self.assertRaisesRegex(ValueError, "relative path"):
      box.write("../x", "no")
    with self.assertRaisesRegex(ValueError, "relative path"):
      box.write("/etc/x", "no")
    box.close()
    self.assertFalse(os.path.exists(path))

  def test_limits_validation_names_the_field(self):
    with self.assertRaisesRegex(ValueError, "limits.wall_s=0"):
      sandbox.Limits(wall_s=0)

  def test_parallel_map_keeps_order_and_uses_separate_boxes(self):
    outs = sandbox.parallel_map(lambda i: sandbox.run(["sh", "-c", f"echo {i}; id -u"]).stdout.split(),
                                range(6), workers=2)
    self.assertEqual([o[0] for o in outs], [str(i) for i in range(6)])
    self.assertTrue(all(int(o[1]) >= 61000 for o in outs))


if __name__ == "__main__":
  absltest.main()
