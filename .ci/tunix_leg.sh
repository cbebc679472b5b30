# The tunix leg of .ci/run (sourced: `tunix_install`, then `tunix_tests`; uses run's `stamp`).
#
#   tunix   Python 3.11 with covrl[tunix,test] in a venv of its own (.venv-tunix): google-tunix
#           0.1.7 brings its own stack (Flax >= 0.12 through qwix, the newest JAX that admits,
#           transformers, grain, datasets...: ~0.7 GB more), so it is installed beside the other
#           legs, never into them; then covrl's control values in tunix's GRPO
#           (tests/test_tunix.py) and notebook 06 at its test size.
tunix_install() {
  local venv=.venv-tunix
  echo "== tunix: install covrl[tunix,test] (Python 3.11, google-tunix 0.1.7)"
  python3 -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q --upgrade pip || return 1
  "$venv/bin/python" -m pip install -q -e ".[tunix,test]" || return 1
  # A tunix that fails to import would make the tests below skip, not fail.
  "$venv/bin/python" -c "import tunix.rl.grpo.grpo_learner, covrl.integrations.tunix" || return 1
  "$venv/bin/python" -m pip freeze | grep -iE '^(google-tunix|jax|jaxlib|flax|optax|qwix)==' \
    | tr '\n' ' ' || return 1
  echo
}
tunix_tests() {
  local venv=.venv-tunix
  stamp "tunix: covrl's losses in tunix's GRPO (tests/test_tunix.py) and notebook 06"
  "$venv/bin/python" -m pytest -q -m 'not notebook' tests/test_tunix.py  # its slow tests too
  "$venv/bin/python" -m pytest -q -m notebook tests/test_notebooks.py -k 06_tunix_kl_cov
}
