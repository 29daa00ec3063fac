"""KARMA: LLM recommenders that keep their language knowledge.

The library behind the platform: data, model, losses, metrics, retrieval, training,
tracking and serving helpers. It knows nothing of HTTP; only `karma.train.ray_job`
knows of Ray.
"""

__version__ = "0.1.0"
