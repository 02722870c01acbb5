"""Autoregressive decoding with a key/value cache: greedy or temperature sampling.

Works for any `step_fn(tokens [B, T], cache, index) -> (logits [B, T, V], cache)`: a plain
`LanguageModel` and the LM fusion model alike. The prompt is one prefill call; every new token is
one step of a `lax.scan`, so the whole generation is one compiled program.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_ids"))
def generate(step_fn, cache, prompt, max_new_tokens: int, rng, temperature=0.0, eos_ids=()):
    """`prompt [B, P]` -> `[B, P + max_new_tokens]`; `cache` must hold P + max_new_tokens slots.

    `step_fn` is a `jax.tree_util.Partial`: its function is static and the arrays bound to it
    (the parameters) are arguments of the compiled program, not constants folded into it.
    temperature 0 is greedy (argmax); otherwise token t is drawn from softmax(logits / T) with
    the key `fold_in(rng, t)`. A sequence that emits one of `eos_ids` has ended: its later
    positions hold `eos_ids[0]` (where transformers writes its pad id; either way the text ends
    at the first eos).
    """
    prompt_len = prompt.shape[1]
    logits, cache = step_fn(prompt, cache, 0)
    eos = jnp.asarray(eos_ids or (-1,), prompt.dtype)

    def pick(last_logits, i):
        sampled = jax.random.categorical(
            jax.random.fold_in(rng, i), last_logits / jnp.maximum(temperature, 1e-6)
        )
        return jnp.where(temperature > 0, sampled, jnp.argmax(last_logits, -1)).astype(prompt.dtype)

    def body(carry, i):
        cache, last_logits, ended = carry
        token = jnp.where(ended, eos[0], pick(last_logits, i))
        ended = ended | jnp.isin(token, eos)
        logits, cache = step_fn(token[:, None], cache, prompt_len + i)
        return (cache, logits[:, -1], ended), token

    start = (cache, logits[:, -1], jnp.zeros(prompt.shape[0], bool))
    _, tokens = jax.lax.scan(body, start, jnp.arange(max_new_tokens))
    return jnp.concatenate([prompt, tokens.T], axis=1)
