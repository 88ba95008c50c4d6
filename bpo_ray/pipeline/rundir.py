"""The run directory (``storage_path/run_name``, local or ``s3://``/``gs://``): a named path for every
output, the stage key, and the manifests that resume reads.

    config.yaml                   the resolved config of the latest job
    tracking.json                 the MLflow / W&B run ids it logs to (``tracking``)
    sft/        samples/ errors/ images/ model/ metrics.jsonl tb/ manifest.json  (sft.enabled)
    data/       samples/ errors/ images/ manifest.json   (images/: each image once; rows reference it)
    negatives/  pairs/ errors/ images/ (existing pairs' images) manifest.json
    reference/  pairs/ (scored) errors/ manifest.json
    checkpoints/<stage>-<key>/    Ray Train's checkpoints of one training run (sft or train)
    train/      metrics.jsonl tb/ manifest.json
    model/      the aligned model (Hugging Face folder)
    eval/       metrics.json predictions.jsonl manifest.json
    report/     manifest.json;  report.json report.md plots/  at the root
    round-<k>/  negatives/ reference/ train/ model/   round k ≥ 2 of bootstrapping (``rounds``)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from bpo_ray import storage
from bpo_ray.config import RunConfig
from bpo_ray.data.images import ImageStore


def stage_key(upstream_output: str, cfg: RunConfig, sections: tuple[str, ...], earlier: bool = False) -> str:
    """What a stage's output belongs to: the config sections it reads and its upstream stage's output (a new
    ``output_id`` each time that stage runs). Finished manifests and checkpoint folders are named by it.
    ``earlier``: the key as run directories made before ``config.NO_LONGER_KEYED`` computed it."""
    return hashlib.sha256((upstream_output + cfg.section_hash(*sections, earlier=earlier)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunDir:
    root: str  # absolute local path or URI
    # The bootstrapping round whose outputs the per-round paths name (negatives, reference, train, model):
    # round 1 at the root, as a one-round run has them, round k ≥ 2 under ``round-<k>/``.
    round: int = 1

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(storage.absolute(cfg.run_dir))

    def at_round(self, k: int) -> RunDir:
        return RunDir(self.root, k)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def _in_round(self, *parts: str) -> str:
        return self.path(*parts) if self.round == 1 else self.path(round_prefix(self.round), *parts)

    # ---- what each stage writes (and the next one reads)
    @property
    def config(self) -> str:
        return self.path("config.yaml")

    @property
    def tracking(self) -> str:
        """The ids of the MLflow / W&B runs this run logs to (``cfg.tracking``), so a resumed job logs on."""
        return self.path("tracking.json")

    def stage_name(self, kind: str) -> str:
        """The name of this round's stage of ``kind``: ``train``, or ``round-2/train`` in round 2."""
        return kind if self.round == 1 else f"{round_prefix(self.round)}/{kind}"

    @property
    def sft_samples(self) -> str:
        return self.path("sft", "samples")

    @property
    def sft_model(self) -> str:
        return self.path("sft", "model")

    @property
    def samples(self) -> str:
        return self.path("data", "samples")

    @property
    def pairs(self) -> str:
        return self._in_round("negatives", "pairs")

    @property
    def scored_pairs(self) -> str:
        return self._in_round("reference", "pairs")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    def checkpoint_run(self, stage: str, key: str) -> str:
        """Ray Train's folder for one training run: ``checkpoints/<stage>-<key[:12]>``."""
        return self.path("checkpoints", checkpoint_name(stage, key))

    def has_checkpoints(self, stage: str, key: str) -> bool:
        """Whether a training run of ``stage`` under ``key`` started checkpointing (Ray Train resumes it)."""
        from bpo_ray.train.fit import RAY_TRAIN_SNAPSHOT

        return storage.exists(storage.join(self.checkpoint_run(stage, key), RAY_TRAIN_SNAPSHOT))

    @property
    def model(self) -> str:
        return self._in_round("model")

    @property
    def eval_metrics(self) -> str:
        return self.path("eval", "metrics.json")

    @property
    def predictions(self) -> str:
        return self.path("eval", "predictions.jsonl")

    @property
    def report_json(self) -> str:
        return self.path("report.json")

    @property
    def report_md(self) -> str:
        return self.path("report.md")

    def plot(self, name: str) -> str:
        return self.path("plots", name)

    def stage_dir(self, stage: str) -> str:
        return self._in_round(stage)

    def image_store(self, stage: str) -> ImageStore:
        """Where ``stage`` (this round's) stores the images it validated, ``<stage>/images``; rows reference them
        relative to the root."""
        return ImageStore(self.root, f"{self.stage_name(stage)}/images")

    def errors(self, stage: str) -> str:
        return self._in_round(stage, "errors")

    def training_log(self, stage: str) -> str:
        """Where a training stage (``sft`` or ``train``) keeps metrics.jsonl and tb/."""
        return self._in_round(stage)

    # ---- bookkeeping
    def save_config(self, cfg: RunConfig) -> str:
        storage.write_text(self.config, cfg.to_yaml())
        return self.config

    def read_manifest(self, *stage: str) -> dict | None:
        target = self.path(*stage, "manifest.json")
        if not storage.exists(target):
            return None
        try:
            return json.loads(storage.read_text(target))
        except json.JSONDecodeError:
            return None  # a torn manifest means the stage did not finish

    def read_manifests(self) -> dict[str, dict]:
        """Every stage's manifest in this run directory, by stage name (``round-<k>/<stage>`` for later rounds')."""
        names = storage.list_dir(self.root)
        found = {name: self.read_manifest(name) for name in names}
        for k in sorted(int(n.split("-")[1]) for n in names if n.startswith("round-") and n.split("-")[1].isdigit()):
            found.update({f"{round_prefix(k)}/{name}": self.read_manifest(round_prefix(k), name)
                          for name in storage.list_dir(self.path(round_prefix(k)))})
        return {name: manifest for name, manifest in found.items() if manifest is not None}

    def write_manifest(self, stage: str, manifest: dict) -> None:
        storage.write_text(self.path(stage, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True))

    def read_training_log(self, stage: str = "train") -> list[dict]:
        path = storage.join(self.training_log(stage), "metrics.jsonl")
        return [json.loads(line) for line in storage.read_text(path).splitlines()] if storage.exists(path) else []


def checkpoint_name(stage: str, key: str) -> str:
    return f"{stage}-{key[:12]}"


def round_prefix(k: int) -> str:
    """The folder of bootstrapping round ``k`` ≥ 2 (and the prefix of its stages' names)."""
    return f"round-{k}"


def split_stage_name(name: str) -> tuple[int, str]:
    """A stage's name → (its round, what it is): ``round-2/train`` → (2, "train"), ``train`` → (1, "train")."""
    prefix, _, kind = name.rpartition("/")
    return (int(prefix.removeprefix("round-")) if prefix else 1), kind


def policy_path(cfg: RunConfig, run: RunDir) -> str:
    """The model ``run``'s round aligns: in round 1 the base (the sft stage's output when this run fine-tunes
    one, else ``model.name_or_path``; tiny models built into the cache on first use), in round k the model
    round k − 1 aligned. The same model is that round's reference and the generator of its weakened-image
    negatives."""
    from bpo_ray.models.loader import resolve_model_path

    if run.round > 1:
        return run.at_round(run.round - 1).model
    if cfg.sft.enabled:
        if not storage.exists(storage.join(run.sft_model, "config.json")):
            raise RuntimeError(f"sft.enabled is true but {run.sft_model} does not exist yet: run the sft stage "
                               "first (bpo sft / jobs/bpo.py run it), or set sft.enabled=false to align "
                               "model.name_or_path")
        return run.sft_model
    return resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)
