"""Run directory and stage bookkeeping: all that resume needs.

A stage is a function ``run_<stage>(cfg, run) -> manifest`` that reads the previous stage's directory and
writes its own. ``Pipeline.stage`` skips a stage whose manifest says *finished* for the same inputs
(a hash of the config sections it reads and of the upstream stage's ``output_id``, which is new every
time that stage runs), and otherwise clears its directory and runs it. A crashed or cancelled job
therefore resumes at the first incomplete stage, and whatever follows a re-run stage re-runs too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from bpo_ray import storage
from bpo_ray.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    root: str  # absolute local path or URI: storage_path/run_name

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(storage.absolute(cfg.run_dir))

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def save_config(self, cfg: RunConfig) -> str:
        target = self.path("config.yaml")
        storage.write_text(target, cfg.to_yaml())
        return target

    def read_manifest(self, stage: str) -> dict | None:
        target = self.path(stage, "manifest.json")
        if not storage.exists(target):
            return None
        try:
            return json.loads(storage.read_text(target))
        except json.JSONDecodeError:
            return None  # a torn manifest means the stage did not finish

    def write_manifest(self, stage: str, manifest: dict) -> None:
        storage.write_text(self.path(stage, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True))


def policy_path(cfg: RunConfig, run: RunDir) -> str:
    """The model BPO aligns (and the base it is compared with): the sft stage's output when this run
    fine-tunes one, else ``model.name_or_path`` (tiny models built into the cache on first use)."""
    from bpo_ray.models.loader import resolve_model_path

    if cfg.sft.enabled:
        trained = run.path("sft", "model")
        if not storage.exists(storage.join(trained, "config.json")):
            raise RuntimeError(f"sft.enabled is true but {trained} does not exist yet: run the sft stage first "
                               "(bpo sft / jobs/bpo.py run it), or set sft.enabled=false to align model.name_or_path")
        return trained
    return resolve_model_path(cfg.model.name_or_path, cfg.cache_dir)


StageFn = Callable[[RunConfig, RunDir], dict]


@dataclass
class Pipeline:
    """Runs stages in order; ``from_stage``/``only_stage`` pick a part, ``force`` ignores finished ones."""

    cfg: RunConfig
    run: RunDir
    order: list[str]
    from_stage: str | None = None
    only_stage: str | None = None
    force: bool = False
    manifests: dict[str, dict] = field(default_factory=dict)
    _upstream_output: str = ""

    def __post_init__(self) -> None:
        for name in (self.from_stage, self.only_stage):
            if name is not None and name not in self.order:
                raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(self.order)}")

    def _selected(self, name: str) -> bool:
        if self.only_stage is not None:
            return name == self.only_stage
        if self.from_stage is not None:
            return self.order.index(name) >= self.order.index(self.from_stage)
        return True

    def _inputs_hash(self, upstream_output: str, sections: tuple[str, ...]) -> str:
        return hashlib.sha256((upstream_output + self.cfg.section_hash(*sections)).encode()).hexdigest()[:16]

    def _finished(self, name: str, inputs_hash: str) -> tuple[bool, dict | None]:
        previous = self.run.read_manifest(name)
        return bool(previous and previous.get("finished") and previous.get("inputs_hash") == inputs_hash), previous

    def all_finished(self, stages: list[tuple[str, StageFn, tuple[str, ...]]]) -> bool:
        """Whether every stage already has finished output for these inputs (nothing would run)."""
        upstream = ""
        for name, _, sections in stages:
            finished, manifest = self._finished(name, self._inputs_hash(upstream, sections))
            if not finished:
                return False
            upstream = manifest.get("output_id", "")
        return True

    def stage(self, name: str, fn: StageFn, sections: tuple[str, ...]) -> dict:
        inputs_hash = self._inputs_hash(self._upstream_output, sections)
        finished, previous = self._finished(name, inputs_hash)
        if not self._selected(name) or (finished and not self.force):
            if not finished and not self._selected(name):
                log.warning("stage %s: not selected and has no finished output", name)
            else:
                log.info("stage %s: finished earlier for the same inputs, skipped", name)
            self.manifests[name] = previous or {}
            self._upstream_output = self.manifests[name].get("output_id", "")
            return self.manifests[name]
        storage.remove_dir(self.run.path(name))
        log.info("stage %s: running", name)
        started = time.time()
        manifest = fn(self.cfg, self.run)
        manifest.update(stage=name, inputs_hash=inputs_hash, output_id=uuid.uuid4().hex, finished=True,
                        seconds=round(time.time() - started, 2), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.run.write_manifest(name, manifest)
        self.manifests[name] = manifest
        self._upstream_output = manifest["output_id"]
        return manifest


def summary(manifests: dict[str, dict]) -> str:
    """The closing lines a job prints: what each stage made and what it dropped, and why."""
    lines = []
    if (sft := manifests.get("sft")) and not sft.get("skipped"):
        lines.append(f"sft: {sft.get('steps')} steps on {sft.get('samples')} samples, final loss "
                     f"{sft.get('final_metrics', {}).get('loss', float('nan')):.4f}, {sft.get('seconds', '?')} s; "
                     f"base: {sft.get('model_dir')}")
    if data := manifests.get("data"):
        lines.append(f"data: {data.get('records_in')} records -> {data.get('samples')} samples, "
                     f"{data.get('records_rejected')} rejected {data.get('errors_by_reason') or ''}")
    if neg := manifests.get("negatives"):
        by_type = ", ".join(f"{t}: {v['pairs']}" for t, v in neg.get("by_type", {}).items())
        lines.append(f"negatives: {neg.get('pairs')} pairs ({by_type}) from {neg.get('samples_in')} samples at "
                     f"{neg.get('samples_per_second')} samples/s; dropped {neg.get('errors_by_reason') or '{}'}")
    if ref := manifests.get("reference"):
        lines.append(f"reference: {ref.get('scored')} of {ref.get('pairs_in')} pairs scored ({ref.get('mode')}); "
                     f"dropped {ref.get('errors_by_reason') or '{}'}")
    if train := manifests.get("train"):
        final = train.get("final_metrics", {})
        lines.append(f"train: {train.get('steps')} steps on {train.get('workers')} workers, final loss "
                     f"{final.get('loss', float('nan')):.4f}, reward margin {final.get('reward_margin', float('nan')):.4f}, "
                     f"accuracy {final.get('reward_accuracy', float('nan')):.2f}; model: {train.get('model_dir')}")
    if ev := manifests.get("eval"):
        served = " and ".join(ev.get("models", {})) or "the models"
        lines.append(f"eval: {ev.get('skipped') or str(ev.get('requests')) + ' requests to ' + served}; "
                     f"failed {ev.get('errors_by_reason') or '{}'}")
    return "\n".join(lines)

