"""The experiments: the checks of every claim of THEORY.md, the report and the `covrl` command.

Not loaded by `import covrl`; they need the labs and matplotlib (the `experiments` extra:
`pip install "covrl[experiments]"`).
`covrl reproduce` (covrl.experiments.cli) runs the claims registered in
`covrl.experiments.claims` and writes the report (covrl.experiments.report).
"""
