"""Every notebook in notebooks/ runs top to bottom (its small CPU variant) without a cell error.

The notebooks switch to their small variant when JAX has no accelerator (`SMALL = not on_accelerator`), so on CPU
this executes exactly what a reader would run, at a size that takes a minute or two per notebook. Executed with
nbclient on the `python3` kernel (ipykernel), from the repository root so that `lacax` and `configs` import from
this checkout.
"""

import glob
import os

from absl.testing import absltest, parameterized
import nbclient
import nbformat

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = sorted(glob.glob(os.path.join(_REPO, "notebooks", "*.ipynb")))
_CELL_TIMEOUT_S = 900


class NotebooksTest(parameterized.TestCase):

  def test_notebooks_exist(self):
    names = {os.path.basename(p) for p in _NOTEBOOKS}
    self.assertContainsSubset({"lacache_quickstart.ipynb", "act.ipynb"}, names)

  @parameterized.named_parameters((os.path.basename(p).removesuffix(".ipynb"), p) for p in _NOTEBOOKS)
  def test_runs_top_to_bottom(self, path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    self.assertEqual(first.cell_type, "markdown")
    self.assertIn("colab.research.google.com/github/", first.source)  # the "Open in Colab" badge
    self.assertIn(f"notebooks/{os.path.basename(path)}", first.source)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=_CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": _REPO}})
    # The kernel runs SmolLM2 for a minute or more: it gets optimised XLA code, not the suite's fast-compile flags.
    env = dict(os.environ)
    added = env.pop("LACAX_TEST_FAST_COMPILE_FLAGS", "")
    if added:
      env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(added, "").strip()
    try:
      client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
      self.fail(f"{os.path.basename(path)}: a cell failed:\n{str(e)[-4000:]}")
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    self.assertEqual(errors, [])
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    self.assertNotEmpty(images, "the notebook shows no plot")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    self.assertIn("small CPU variant", text)


if __name__ == "__main__":
  absltest.main()
