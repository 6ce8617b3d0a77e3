"""ld-jax: likelihood displacement in direct preference learning, in JAX."""

__version__ = "0.1.0"
