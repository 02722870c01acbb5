"""fusion_jax: dynamic fusion vs static merging of Transformer experts on grokking tasks."""
