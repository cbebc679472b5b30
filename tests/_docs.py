"""Reading the code in the README, the manual and the notebooks, for the tests that run it."""

import pathlib
import re
import shlex
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPOSITORY = "git+https://github.com/covrl/covrl"


def code_blocks(text: str, language: str) -> list[str]:
  """The fenced code blocks of a markdown text in `language`."""
  return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[str]:
  """Shell commands: each line of the bash blocks, and each inline code span of the prose
  (a span broken over two lines joined back)."""
  found = [line for block in code_blocks(text, "bash") for line in block.splitlines()]
  prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
  return found


def extras() -> set[str]:
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  return set(pyproject["project"]["optional-dependencies"])


def install_problems(lines: list[str]) -> list[str]:
  """The `pip install` commands among `lines` that would not work as written. covrl is on no
  package index: it installs from a clone (`-e .`, `-e ".[extra]"`) or from the repository's
  URL (`"covrl[extra] @ git+https://github.com/covrl/covrl"`); the extras named must exist."""
  problems = []
  for line in lines:
    for part in re.split(r"&&|;", line.split(" #")[0]):
      if "pip install" not in part:
        continue
      try:
        tokens = shlex.split(part.split("pip install", 1)[1])
      except ValueError as e:
        problems.append(f"{part.strip()}: {e}")
        continue
      for token in tokens:
        match = re.fullmatch(r"(covrl|\.|\.?/\S*)(?:\[([^\]]*)\])?(.*)", token)
        if not match:  # options, other packages ("flax==0.12.0")
          continue
        name, named, rest = match.groups()
        for extra in filter(None, (e.strip() for e in (named or "").split(","))):
          if extra not in extras():
            problems.append(f"{part.strip()}: no extra {extra!r}")
        if name == "covrl" and rest.replace(" ", "") != "@" + REPOSITORY:
          problems.append(f"{part.strip()}: installs {token!r} from a package index, where "
                          "covrl is not")
  return problems
