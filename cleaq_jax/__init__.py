"""cleaq_jax: CLEAQ-DR (quality-assessment-guided collaborative learning of fundus image
enhancement, quality assessment and diabetic-retinopathy grading) in JAX/Flax."""

__version__ = "0.1.0"
