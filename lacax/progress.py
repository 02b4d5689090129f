"""The one progress bar of lacax's jobs and benchmarks (tqdm; silent when tqdm is missing or TQDM_DISABLE=1)."""

from __future__ import annotations

from typing import Any, Iterable


class ProgressBar:
  """A counter with an optional tqdm bar.

    bar = ProgressBar(total=10, desc="passkey", unit="prompt")
    bar.advance(2, postfix="len 512")      # two more done
    bar.set(done=640, rate_unit="tok")     # absolute progress; postfix "<rate> tok/s"
    bar.close()

  Also a context manager (closes on exit) and an iterable wrapper (`ProgressBar.wrap(items, desc)`).
  """

  def __init__(self, total: int, desc: str, unit: str = "it", *, enabled: bool = True, leave: bool = True):
    self.total, self.done = total, 0
    self._bar = None
    if enabled:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      except ImportError:
        tqdm = None
      if tqdm is not None:
        self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0, leave=leave)

  def advance(self, n: int = 1, postfix: str | None = None) -> None:
    self.set(self.done + n, postfix=postfix)

  def set(self, done: int, *, postfix: str | None = None, seconds: float | None = None,
          rate_unit: str | None = None) -> None:
    """Sets the count to `done`; with `seconds`, shows `done / seconds` `rate_unit`/s as the postfix."""
    self.done = done
    if self._bar is None:
      return
    self._bar.update(done - self._bar.n)
    if seconds is not None:
      postfix = f"{done / max(seconds, 1e-9):.1f} {rate_unit or 'it'}/s" + (f", {postfix}" if postfix else "")
    if postfix:
      self._bar.set_postfix_str(postfix)
    if done >= self.total:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @classmethod
  def wrap(cls, items: Iterable[Any], desc: str, *, enabled: bool = True, unit: str = "it") -> Iterable[Any]:
    """Iterates `items`, advancing a bar (total = len(items) when it has one)."""
    items = list(items)
    with cls(len(items), desc, unit, enabled=enabled, leave=False) as bar:
      for item in items:
        yield item
        bar.advance()


def rate_callback(total: int, desc: str, unit: str = "tok"):
  """A `callback(done, seconds)` that drives a bar (the form `lacax.eval.perplexity.streaming_nll` reports in)."""
  bar = ProgressBar(total, desc, unit)

  def update(done: int, seconds: float) -> None:
    bar.set(done, seconds=seconds, rate_unit=unit)

  return update
