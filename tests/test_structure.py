"""The package's structure: what `import covrl` loads, and no module reaching into another's
private names."""

import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "covrl"


def test_import_covrl_loads_the_library_only():
  code = ("import sys, json, covrl; "
          "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('covrl', 'flax', 'orbax', 'matplotlib', 'chex'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  loaded = json.loads(out.stdout.strip().splitlines()[-1])
  heavy = [m for m in loaded if m.split(".")[0] in ("flax", "orbax", "matplotlib")]
  labs = [m for m in loaded if m.startswith(("covrl.tabular", "covrl.transformer",
                                             "covrl.experiments"))]
  assert not heavy, heavy
  assert not labs, labs
  assert "covrl.losses" in loaded and "covrl.controllers" in loaded


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def _private_uses(path: pathlib.Path) -> list[str]:
  """`from covrl.x import _name` and `alias._name` on an imported covrl module, where `_name`
  is not itself a module (a package's private modules, such as covrl._checks, may be used)."""
  tree = ast.parse(path.read_text())
  here = _module_name(path)
  aliases: dict[str, str] = {}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covrl"):
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        if _is_module(target):
          aliases[alias.asname or alias.name] = target
        elif alias.name.startswith("_") and node.module != here:
          found.append(f"{here}: from {node.module} import {alias.name}")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("covrl"):
          aliases[alias.asname or alias.name.split(".")[0]] = (
              alias.name if alias.asname else alias.name.split(".")[0])
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
        and node.value.id in aliases):
      target = f"{aliases[node.value.id]}.{node.attr}"
      if not _is_module(target):
        found.append(f"{here}: {node.value.id}.{node.attr}")
  return found


def test_no_module_uses_another_modules_private_names():
  found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
  assert not found, "\n".join(found)


def test_the_private_name_check_finds_a_violation(tmp_path):
  bad = PACKAGE / "_structure_probe.py"
  bad.write_text("from covrl import selection\nfrom covrl.losses import _only\n"
                 "x = selection._mix32\n")
  try:
    found = _private_uses(bad)
  finally:
    bad.unlink()
  assert len(found) == 2, found


def test_modules_are_at_most_about_400_lines():
  sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
  assert all(n <= 450 for n in sizes.values()), {k: v for k, v in sizes.items() if v > 450}
