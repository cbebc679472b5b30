"""The transformer lab: a small Flax policy trained with GRPO on verifiable-reward tasks."""
