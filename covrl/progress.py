"""Progress for long runs, reported from outside the compiled code.

Long loops run as `lax.scan` over chunks; between chunks the host calls `Progress.update`. Nothing
here is called inside jit, so progress never slows the compiled step. Output goes to stderr as a
single rewritten line on a terminal and as occasional plain lines elsewhere (CI logs, notebooks).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
  """A minimal progress line: `label [#####.....] 50/100 12.3s eta 12.3s`.

  Example:
    >>> p = Progress(3, "demo", stream=None)
    >>> for _ in range(3):
    ...   p.update()
    >>> p.done
    True
  """

  def __init__(self, total: int, label: str = "", *, stream: TextIO | None = sys.stderr,
               min_interval: float = 0.5):
    if total < 0:
      raise ValueError(f"total must be >= 0, got {total}.")
    self.total, self.label, self.stream = total, label, stream
    self.count, self.start = 0, time.perf_counter()
    self._last, self._min_interval = -1.0, min_interval
    self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

  @property
  def done(self) -> bool:
    return self.count >= self.total

  def update(self, n: int = 1, note: str = "") -> None:
    self.count = min(self.total, self.count + n)
    now = time.perf_counter()
    interval = self._min_interval if self._tty else max(self._min_interval, 10.0)
    if self.stream is None or (not self.done and now - self._last < interval):
      return
    self._last = now
    elapsed = now - self.start
    frac = self.count / self.total if self.total else 1.0
    eta = elapsed / frac - elapsed if frac > 0 else float("nan")
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (f"{self.label} [{bar}] {self.count}/{self.total} {elapsed:.1f}s"
            f"{'' if self.done else f' eta {eta:.1f}s'}{' ' + note if note else ''}")
    if self._tty:
      self.stream.write("\r" + line + ("\n" if self.done else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
