#!/usr/bin/env bash
# Install covrl with the benchmark extras (CPU PyTorch 2.13.0, verl 0.9.1's loss functions and
# TRL 1.16.0's GRPO trainer module, for tests/test_trl_parity.py).
#
#   bash benchmarks/install.sh [VENV_DIR | PYTHON]
#
# With a directory, creates the virtual environment there if missing and installs into it; with a
# python executable, installs into that interpreter; with nothing, into `python3` on PATH.
#
# The `bench` extra in pyproject.toml holds what pip can resolve: torch==2.13.0 and the few
# packages verl's import chain needs (verl.trainer.ppo.core_algos imports verl/__init__, which
# imports ray, tensordict, transformers, omegaconf, codetiming, orjson). verl itself is installed
# with --no-deps: its full requirement list (vllm-era training stack: accelerate, datasets, peft,
# wandb, ...) is not needed to call its loss functions. trl likewise: its GRPO trainer module
# (GRPOTrainer.get_high_entropy_mask) imports accelerate, datasets and pandas, in the extra.
#
# torch: use the CPU build. Where pip sees only the default index, `torch==2.13.0` on Linux is the
# multi-GB CUDA build; point pip at PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) or at a local
# CPU wheel (PIP_FIND_LINKS) first.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-python3}"
if [[ -d "$target" || "$target" != *python* ]]; then
  [[ -x "$target/bin/python" ]] || python3 -m venv "$target"
  py="$target/bin/python"
else
  py="$target"
fi
"$py" -m pip install -q -e ".[bench]"
"$py" -m pip install -q --no-deps "verl==0.9.1" "trl==1.16.0"
"$py" - <<'PY'
import torch
from verl.trainer.ppo import core_algos  # noqa: F401
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: F401
import trl
import verl
print(f"benchmark extras ready: torch {torch.__version__}, verl {verl.__version__}, "
      f"trl {trl.__version__}")
if "+cpu" not in torch.__version__ and torch.version.cuda is not None:
  print("note: this torch is a CUDA build; the benchmark runs on CPU either way")
PY
