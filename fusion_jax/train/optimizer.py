"""The reference optimiser: AdamW with a linear warm-up from lr 0."""

import jax
import optax


def warmup_schedule(learning_rate: float, warmup_steps: int):
    """lr * min(t / warmup, 1) for update t = 0, 1, ... (as torch LambdaLR: first update lr 0)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)


def make_optimizer(opt_config, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """AdamW on every parameter (the reference decays biases, norms and embeddings too).

    Top-level parameter collections named in `frozen` get no update at all (no weight decay
    either), e.g. `("ensemble",)` trains a fusion model's gate and head over fixed experts.
    """
    adamw = optax.adamw(
        learning_rate=warmup_schedule(opt_config.learning_rate, opt_config.warmup_steps),
        b1=opt_config.b1,
        b2=opt_config.b2,
        eps=opt_config.eps,
        weight_decay=opt_config.weight_decay,
    )
    if not frozen:
        return adamw

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: k in frozen, v) for k, v in params.items()}

    return optax.multi_transform({False: adamw, True: optax.set_to_zero()}, labels)
