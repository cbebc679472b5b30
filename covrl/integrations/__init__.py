"""Optional bridges from covrl's control values to other training engines.

Each submodule imports its engine only when one of its functions is called, so `import covrl`
never needs the engine installed: `covrl.integrations.tunix` needs `pip install "covrl[tunix]"`.
"""
