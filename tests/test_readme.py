"""The README's code runs as written: its Python blocks (with a tiny model standing in for
`policy_apply`), and its shell commands as far as a test can run them (the install lines name
extras that exist and install from the clone or the repository, the `covrl` commands parse)."""

import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
from _docs import REPOSITORY, ROOT, code_blocks, commands, install_problems

README = ROOT / "README.md"


def python_blocks() -> list[str]:
  return code_blocks(README.read_text(), "python")


def test_the_loss_example_trains_a_step():
  blocks = python_blocks()
  assert len(blocks) >= 2
  vocab, b, t, d = 7, 3, 5, 4

  def policy_apply(params, tokens):  # a stand-in model: embeddings then a projection
    return params["emb"][tokens] @ params["out"]

  namespace = {"policy_apply": policy_apply}
  exec(blocks[0], namespace)
  rng = np.random.default_rng(0)
  params = {"emb": jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32),
            "out": jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)}
  responses = jnp.asarray(rng.integers(0, vocab, (b, t)))
  batch = {"tokens": responses, "responses": responses,
           "old_log_prob": jnp.asarray(-rng.exponential(size=(b, t)), jnp.float32),
           "advantages": jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
           "response_mask": jnp.ones((b, t), bool)}
  opt_state = namespace["optimizer"].init(params)
  new, _, metrics = namespace["train_step"](params, opt_state, batch, jax.random.key(0), 0)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["selected_frac"]) > 0
  assert not np.array_equal(np.asarray(new["out"]), np.asarray(params["out"]))


def test_the_transform_example_builds():
  namespace = {}
  exec(python_blocks()[1], namespace)
  z = jnp.array([1.0, 0.0, -1.0])
  opt = namespace["opt"]
  updates, _ = opt.update(jnp.zeros(3), opt.init(z), z)
  assert np.all(np.isfinite(np.asarray(updates)))


def test_every_python_block_is_run_above():
  assert len(python_blocks()) == 2


def test_install_lines_work_as_written():
  lines = commands(README.read_text())
  assert any("pip install -e" in line for line in lines)
  assert any(f"@ {REPOSITORY}" in line for line in lines)
  assert install_problems(lines) == []


def test_the_install_check_finds_lines_that_fail():
  assert install_problems(['pip install "covrl[tunix]"'])  # from an index
  assert install_problems(["pip install covrl"])
  assert install_problems(['pip install -e ".[nosuchextra]"'])
  assert not install_problems(['pip install -q "covrl[tunix] @ git+https://github.com/covrl/covrl"'
                               ' "flax==0.12.0"'])


def test_the_covrl_commands_parse():
  from covrl.experiments import cli

  found = [part.split("covrl ", 1)[1] for line in commands(README.read_text())
           for part in line.split("&&") if re.search(r"(^|/)covrl (reproduce|list)", part.strip())]
  assert any(c.startswith("reproduce") for c in found), found
  for command in found:
    cli._parser().parse_args(shlex.split(command))  # SystemExit on an option that does not exist


def test_the_bibtex_entry_is_well_formed():
  (entry,) = code_blocks(README.read_text(), "bibtex")
  assert entry.count("{") == entry.count("}")
  for field in ("author", "title", "year", "url"):
    assert re.search(rf"^\s*{field}\s*=", entry, flags=re.M), field


def test_no_measured_numbers_or_issue_numbers():
  """Measured numbers live where they are generated (the report, the benchmarks); the front
  page holds none, and no references to the project's issues. The one exception is what a new
  user needs before running the two commands: how long each takes, in their own section."""
  text = README.read_text()
  assert not re.search(r"\bissues? \d+", text, flags=re.I)
  head, _, rest = text.partition("## Install and the two commands")
  section, _, tail = rest.partition("\n## ")
  timed = re.compile(r"\d+(\.\d+)?\s*(min|minutes|ms|GiB|MiB|tokens per second)\b")
  assert not timed.search(head + tail)
  # In that section: only the times of the main job, its long size and the tests.
  found = [m.group(0) for m in timed.finditer(section)]
  assert len(found) <= 3 and all(f.endswith("minutes") for f in found), found
  assert len(text.splitlines()) <= 200
