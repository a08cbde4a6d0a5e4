"""polar-jax: Polar Sparsity (batched decoding with contextual sparsity) in JAX and Pallas.

`polar_jax.generate(model, prompts, ...)` is the Python entry point for batched generation
(`polar_jax.decode.generate`); the command line is `polar-jax` (`polar_jax.cli`). Both take
their defaults from, and check their arguments with, `polar_jax.settings`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "generate":  # imported on first use: `import polar_jax` stays light
        from polar_jax.decode import generate

        return generate
    raise AttributeError(f"module 'polar_jax' has no attribute {name!r}")
