"""one_jax: ONE and two-stage cooperative networks in JAX/Flax."""
