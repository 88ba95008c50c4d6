"""The pipeline: its stages in order and the job that runs them (``bpo run``, ``jobs/bpo.py``)."""

from bpo_ray.pipeline.job import STAGES, main, stages_until

__all__ = ["STAGES", "main", "stages_until"]
