"""Measured tables in the manual, read from the files the benchmarks write (never typed in).

    ```{vocab-benchmark} benchmarks/vocab_results_dedicated.json benchmarks/vocab_results_16k.json
    ```

renders one row per size (B x T x V) of the files' rows for covrl's fused and unfused paths:
median time and peak resident memory above the idle process, and where both paths ran, the
fused path's share of each. Paths are relative to the repository's root; a missing file, or one
without rows, is an error (the build fails).
"""

import json
import pathlib

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

ROOT = pathlib.Path(__file__).resolve().parents[2]
GIB = 2.0**30


def _k(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _table(header: list[str], rows: list[list[str]]) -> nodes.table:
  table = nodes.table()
  group = nodes.tgroup(cols=len(header))
  table += group
  group.extend(nodes.colspec(colwidth=1) for _ in header)

  def row(cells):
    r = nodes.row()
    for cell in cells:
      entry = nodes.entry()
      entry += nodes.paragraph(text=cell)
      r += entry
    return r

  head = nodes.thead()
  head += row(header)
  body = nodes.tbody()
  body.extend(row(cells) for cells in rows)
  group += head
  group += body
  return table


class VocabBenchmark(SphinxDirective):
  required_arguments = 1
  optional_arguments = 20

  def run(self):
    found: dict[tuple[int, int], dict[str, dict]] = {}
    sources = []
    for name in self.arguments:
      path = ROOT / name
      self.env.note_dependency(str(path))
      doc = json.loads(path.read_text())
      rows = doc["results"]["rows"]
      if not rows:
        raise self.error(f"{name} has no rows")
      machine = doc.get("machine", {})
      sources.append(f"{name} ({doc.get('started', '?')}, {machine.get('processor', '?')}, "
                     f"{machine.get('cpu_count', '?')} CPUs, platform {doc.get('platform', '?')})")
      for r in rows:
        found.setdefault((r["n"], r["v"]), {})[r["contestant"]] = r

    def cell(r, key, scale=1.0, unit=""):
      return "not run" if r is None or r.get(key) is None else f"{r[key] / scale:.2f}{unit}"

    out = []
    for (n, v), by in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
      fused, unfused = by.get("covrl_fused"), by.get("covrl_unfused")
      both = fused is not None and unfused is not None
      out.append([
          f"{_k(n)} x {_k(v)}",
          cell(fused, "median_s", unit=" s"), cell(fused, "peak_above_idle_bytes", GIB, " GiB"),
          cell(unfused, "median_s", unit=" s"),
          cell(unfused, "peak_above_idle_bytes", GIB, " GiB"),
          f"{fused['median_s'] / unfused['median_s']:.2f}" if both else "",
          f"{fused['peak_above_idle_bytes'] / unfused['peak_above_idle_bytes']:.3f}"
          if both else ""])
    header = ["B T x V", "fused: time", "fused: peak", "unfused: time", "unfused: peak",
              "time ratio", "peak ratio"]
    note = nodes.paragraph(text="Read at build time from " + "; ".join(sources) + ".")
    return [_table(header, out), note]


def setup(app):
  app.add_directive("vocab-benchmark", VocabBenchmark)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
