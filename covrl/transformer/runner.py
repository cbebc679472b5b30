"""Long GRPO runs: chunks with progress, orbax checkpoints, interruption and exact resume.

`run_training` calls the compiled `Trainer.run` on chunks of `chunk_steps` steps and reports
progress between chunks (covrl.progress), never from inside compiled code. Every
`checkpoint_every` chunks it writes the loop state and the metrics so far:

  1. into a fresh temporary directory `.tmp-step_N-<pid>` (orbax for the state, NumPy for the
     metrics, JSON for what identifies the run);
  2. then renames it to `step_N` in one atomic `os.rename`;
  3. then removes older `step_*` checkpoints beyond the newest `keep`.

A crash or Ctrl-C at any moment leaves the last good `step_*` intact (at worst a stale `.tmp-*`,
removed on the next start). Run again with the same directory and the run resumes from the newest
checkpoint. Because step t draws its randomness from fold_in(key, t) and the chunks are the same
compiled program, the resumed run ends with exactly the state and metrics of an uninterrupted one.
A checkpoint written by a different config, control or key is refused, not silently reused.

Multi-process runs (jax.distributed) are not checkpointed here: pass no `checkpoint_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl.progress import Progress
from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import Trainer, TrainState, get_trainer

_PREFIX = "step_"


def _fingerprint(config: GRPOConfig, control: covrl.Control, key: jax.Array, warm: bool) -> str:
  key_data = np.asarray(jax.random.key_data(key)).tolist()
  return json.dumps({"config": repr(config), "control": repr(control), "key": key_data,
                     "given_params": not warm}, sort_keys=True)


def _checkpoints(directory: Path) -> list[Path]:
  number = lambda p: p.name[len(_PREFIX):]
  done = [p for p in directory.glob(f"{_PREFIX}*") if p.is_dir() and number(p).isdigit()]
  return sorted(done, key=lambda p: int(number(p)))


def save_checkpoint(directory: str | os.PathLike, state: TrainState, metrics: dict[str, Any],
                    fingerprint: str, keep: int = 1) -> Path:
  """Write `state` and `metrics` as directory/step_N atomically; keep the newest `keep`."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  step = int(state.step)
  final = directory / f"{_PREFIX}{step:08d}"
  tmp = directory / f".tmp-{_PREFIX}{step:08d}-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  import orbax.checkpoint as ocp  # a heavy import, needed only when checkpointing

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / "state", state)
  checkpointer.wait_until_finished()
  checkpointer.close()
  np.savez(tmp / "metrics.npz", **{k: np.asarray(v) for k, v in metrics.items()})
  with open(tmp / "run.json", "w") as f:
    json.dump({"fingerprint": fingerprint, "step": step}, f)
    f.flush()
    os.fsync(f.fileno())
  if final.exists():  # the same step written before (an interrupted resume): replace it
    shutil.rmtree(final)
  os.rename(tmp, final)
  for old in _checkpoints(directory)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return final


def load_checkpoint(directory: str | os.PathLike, like: TrainState, fingerprint: str
                    ) -> tuple[TrainState, dict[str, np.ndarray]] | None:
  """The newest checkpoint in `directory` as (state, metrics), or None when there is none.

  Raises:
    ValueError: the checkpoint belongs to a different run (config, control or key).
  """
  directory = Path(directory)
  if not directory.exists():
    return None
  for stale in directory.glob(f".tmp-{_PREFIX}*"):
    shutil.rmtree(stale, ignore_errors=True)
  found = _checkpoints(directory)
  if not found:
    return None
  path = found[-1]
  with open(path / "run.json") as f:
    saved = json.load(f)
  if saved["fingerprint"] != fingerprint:
    raise ValueError(
        f"the checkpoint in {path} was written by a different run (config, control or key); "
        "use another checkpoint_dir or delete it.")
  import orbax.checkpoint as ocp  # a heavy import, needed only when checkpointing

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(path / "state", abstract)
  checkpointer.close()
  # Match `like` leaf by leaf: an array restored committed to a device where `like` was not
  # would make the compiled step recompile (jit's cache key includes commitment).
  state = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding) if ref.committed
                       else jnp.asarray(np.asarray(x)), state, like)
  with np.load(path / "metrics.npz") as data:
    metrics = {k: data[k] for k in data.files}
  return TrainState(*state), metrics


def _default_chunk(num_steps: int) -> int:
  target = max(1, num_steps // 10)
  return max(d for d in range(1, target + 1) if num_steps % d == 0)


def run_training(
    config: GRPOConfig,
    key: jax.Array,
    *,
    params: Any = None,
    control: covrl.Control | None = None,
    chunk_steps: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    keep: int = 1,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    trainer: Trainer | None = None,
) -> tuple[TrainState, dict[str, np.ndarray]]:
  """A GRPO run in chunks, with progress and (optionally) checkpoints to resume from.

  Args:
    config: the run (config.num_steps steps).
    key: PRNG key of the run.
    params: start from these parameters instead of a fresh model and its warm start.
    control: run this control value instead of config.control (of the same family: see
      `Trainer.check_control`).
    chunk_steps: steps per compiled call; must divide num_steps (default: about a tenth).
    checkpoint_dir: where to write and look for checkpoints (None: no checkpoints).
    checkpoint_every: write a checkpoint every this many chunks (and at the end).
    keep: how many of the newest checkpoints to keep (>= 1).
    progress: print a progress line between chunks (to stderr).
    mesh: device mesh for data parallelism (see `Trainer`).
    trainer: the Trainer to run (default: `get_trainer(config, mesh)`, shared by equal configs).

  Returns:
    (final state, metrics as NumPy arrays of shape [num_steps]).
  """
  trainer = get_trainer(config, mesh) if trainer is None else trainer
  if trainer.config != config:
    raise ValueError("trainer was built for a different config.")
  control = config.control if control is None else control
  num_steps = config.num_steps
  chunk_steps = _default_chunk(num_steps) if chunk_steps is None else chunk_steps
  if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1 or (
      num_steps % chunk_steps):
    raise ValueError(f"chunk_steps={chunk_steps!r} must be an int >= 1 dividing num_steps="
                     f"{num_steps}.")
  if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
    raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}.")
  if not (isinstance(keep, int) and keep >= 1):
    raise ValueError(f"keep must be an int >= 1, got {keep!r}.")
  if checkpoint_dir is not None and jax.process_count() > 1:
    raise NotImplementedError("checkpoints of multi-process runs are not supported here.")

  state = trainer.init(key, params, control=control)
  fingerprint = _fingerprint(config, control, key, params is None)
  history: dict[str, list[np.ndarray]] = {}
  if checkpoint_dir is not None:
    restored = load_checkpoint(checkpoint_dir, state, fingerprint)
    if restored is not None:
      state, saved = restored
      history = {k: [v] for k, v in saved.items()}

  done = int(state.step)
  bar = Progress(num_steps, label=f"GRPO {control.label}",
                 stream=sys.stderr if progress else None)
  if done:
    bar.update(done, note="resumed from a checkpoint")
  chunks = 0
  while done < num_steps:
    state, metrics = trainer.run(state, chunk_steps)
    metrics = jax.tree.map(np.asarray, metrics)
    for k, v in metrics.items():
      history.setdefault(k, []).append(v)
    done += chunk_steps
    chunks += 1
    bar.update(chunk_steps, note=f"reward {metrics['reward'][-1]:.3f} "
                                 f"entropy {metrics['entropy'][-1]:.3f}")
    if checkpoint_dir is not None and (chunks % checkpoint_every == 0 or done == num_steps):
      save_checkpoint(checkpoint_dir, state, _concat(history), fingerprint, keep)
  return state, _concat(history)


def _concat(history: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in history.items()}
