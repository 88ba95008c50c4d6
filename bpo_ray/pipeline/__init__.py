"""The pipeline: its stages in order, the loop that runs them, the run directory they write.

    from bpo_ray.pipeline import run_stages
    manifests = run_stages(cfg, until="negatives")   # on the Ray cluster this process is connected to
"""

from bpo_ray.pipeline.job import STAGES, main, run_stages, stages_until
from bpo_ray.pipeline.rundir import RunDir, policy_path, stage_key
from bpo_ray.pipeline.runner import MissingInputs, Pipeline, Stage

__all__ = ["STAGES", "MissingInputs", "Pipeline", "RunDir", "Stage", "main", "policy_path", "run_stages", "stage_key", "stages_until"]
