"""mmjax: multimodal models and a sharded trainer in JAX/Flax."""

__version__ = "0.1.0"
