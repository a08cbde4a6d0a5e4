"""polar-jax: Polar Sparsity (batched decoding with contextual sparsity) in JAX and Pallas."""

__version__ = "0.1.0"
