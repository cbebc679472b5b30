#!/usr/bin/env bash
# Run an install command and fail if it changed the JAX stack of the environment it installs into.
#
#   bash .ci/same_stack.sh VENV COMMAND...
#
# Compares `pip freeze` of VENV before and after COMMAND for the packages a runtime (Colab, a TPU
# or CUDA image) ships preinstalled and pairs with its accelerator plugin: jax, jaxlib, the
# plugins, flax, optax, chex, orbax-checkpoint, numpy. Any added, removed or changed version fails.
set -euo pipefail
venv="$1"; shift
stack() {
  "$venv/bin/python" -m pip freeze --all 2>/dev/null \
    | grep -iE '^(jax|jaxlib|jax[-_]cuda[0-9]+[-_][a-z_]+|libtpu[a-z_-]*|flax|optax|chex|orbax[-_]checkpoint|numpy)(==| @)' \
    | tr '[:upper:]' '[:lower:]' | sort || true
}
before="$(stack)"
"$@"
after="$(stack)"
if [[ "$before" != "$after" ]]; then
  echo "the install changed the preinstalled JAX stack of $venv:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "JAX stack of $venv unchanged by the install:" $(echo "$before" | tr '\n' ' ')
