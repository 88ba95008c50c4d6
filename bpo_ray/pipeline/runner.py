"""The one loop that runs stages, and all that resume needs.

A stage is a function ``run(cfg, run_dir, key) -> manifest`` that reads the previous stage's outputs and
writes its own. A stage whose manifest says *finished* for the same key (``stage_key``: the config sections
it reads and the upstream stage's output) is skipped; otherwise its directory is cleared and it runs. A
crashed or cancelled job therefore resumes at the first incomplete stage, and whatever follows a re-run
stage re-runs too. Training stages name their checkpoint folder by the key, so they resume mid-run, and
keep their log across the re-run (``Stage.keep``). Keys computed by earlier code for the same inputs still
count, for finished output and for an interrupted run's checkpoints, so old run directories resume.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bpo_ray import storage, tracking
from bpo_ray.config import RunConfig
from bpo_ray.pipeline.rundir import RunDir, split_stage_name, stage_key

log = logging.getLogger("bpo_ray.pipeline")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, RunDir, str], dict]
    reads: tuple[str, ...]  # the config sections (``train``) or fields (``train.loss``) its output depends on
    # Entries of its folder a re-run leaves in place: a training stage's log, which goes on when its
    # training run resumes from a checkpoint (and which it clears itself when it starts a fresh one).
    keep: tuple[str, ...] = ()
    # The bootstrapping round it belongs to: it runs on the run directory's view of that round (its
    # per-round paths, and the previous round's model as its policy).
    round: int = 1
    # What it read before its ``reads`` were narrowed: output finished under those keys is still its output
    # for the same config, so a run directory from before resumes without re-running it.
    read_before: tuple[tuple[str, ...], ...] = ()
    # The paths from outside the run directory it opens, by config key (``pipeline/inputs.py``).
    inputs: Callable[[RunConfig], dict[str, str | None]] | None = None


class MissingInputs(FileNotFoundError):
    """Paths the stages about to run would open that do not exist (or cannot be reached)."""

    def __init__(self, missing: dict[str, tuple[str, list[str], str]]):
        self.missing = missing  # config key → (path, the stages that would open it, why it cannot be read)
        lines = [f"  {key}: {path} ({why}; read by {', '.join(stages)})" for key, (path, stages, why) in missing.items()]
        super().__init__("input not found:\n" + "\n".join(lines))


@dataclass
class Pipeline:
    """Runs ``stages`` in order; ``from_stage``/``only_stage`` pick a part, ``force`` ignores finished ones."""

    cfg: RunConfig
    run: RunDir
    stages: Sequence[Stage]
    from_stage: str | None = None
    only_stage: str | None = None
    force: bool = False
    manifests: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        for name in (self.from_stage, self.only_stage):
            if name is not None and name not in names:
                raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(names)}")

    def _selected(self, index: int) -> bool:
        names = [s.name for s in self.stages]
        if self.only_stage is not None:
            return names[index] == self.only_stage
        if self.from_stage is not None:
            return index >= names.index(self.from_stage)
        return True

    def _keys(self, stage: Stage, upstream: str) -> tuple[str, list[str]]:
        """The stage's key, and the keys earlier code gave the same inputs (its fields no longer keyed put
        back; what it read before its reads were narrowed), under which its output still counts."""
        key = stage_key(upstream, self.cfg, stage.reads)
        earlier = {stage_key(upstream, self.cfg, reads, earlier=True) for reads in (stage.reads, *stage.read_before)}
        return key, sorted(earlier - {key})

    def _finished(self, stage: Stage, key: str, earlier: list[str]) -> tuple[bool, dict | None]:
        previous = self.run.read_manifest(stage.name)
        finished = previous and previous.get("finished") and previous.get("inputs_hash") in (key, *earlier)
        return bool(finished), previous

    def _checkpoint_key(self, stage: Stage, key: str, earlier: list[str]) -> str:
        """The key a stage's checkpoints go under: its own, unless it started training under an earlier key
        and was interrupted (its checkpoints are there, and not yet under its own key): then that one, so the
        run resumes instead of starting over."""
        if not earlier:  # nothing to choose from: no storage reads
            return key
        kind = split_stage_name(stage.name)[1]
        started = [k for k in (key, *earlier) if self.run.has_checkpoints(kind, k)]
        return started[0] if started else key

    def pending(self) -> list[Stage]:
        """The stages ``run_all`` would run, in order: the first selected one not finished for these inputs
        (any selected one with ``force``), and every selected one after it, whose upstream it changes."""
        upstream, pending = "", []
        for index, stage in enumerate(self.stages):
            selected = self._selected(index)
            if pending:
                if selected:
                    pending.append(stage)
                continue
            finished, manifest = self._finished(stage, *self._keys(stage, upstream))
            if selected and (self.force or not finished):
                pending.append(stage)
            else:
                upstream = (manifest or {}).get("output_id", "")
        return pending

    def check_inputs(self, pending: list[Stage] | None = None) -> None:
        """Raises MissingInputs naming every path a pending stage would open that does not exist (each path
        looked up once, however many stages open it). The entry points call it before Ray starts.
        ``pending``: ``self.pending()``, when the caller has it."""
        named: dict[str, tuple[str, list[str]]] = {}
        for stage in self.pending() if pending is None else pending:
            for key, path in (stage.inputs(self.cfg) if stage.inputs else {}).items():
                if path:
                    named.setdefault(key, (path, []))[1].append(stage.name)
        found = {key: (path, stages, why) for key, (path, stages) in named.items() if (why := _unreadable(path))}
        if found:
            raise MissingInputs(found)

    def run_all(self) -> dict[str, dict]:
        tracked = tracking.open_run(self.cfg, self.run.tracking)  # None unless cfg.tracking names a backend
        upstream = ""
        try:
            for index, stage in enumerate(self.stages):
                manifest = self._run_one(index, stage, upstream, tracked)
                upstream = manifest.get("output_id", "")
        except BaseException:
            tracking.finish(tracked, ok=False)
            raise
        tracking.finish(tracked, ok=True)
        return self.manifests

    def _run_one(self, index: int, stage: Stage, upstream: str, tracked: tracking.TrackedRun | None = None) -> dict:
        key, earlier = self._keys(stage, upstream)
        finished, previous = self._finished(stage, key, earlier)
        if not self._selected(index) or (finished and not self.force):
            if not finished and not self._selected(index):
                log.warning("stage %s: not selected and has no finished output", stage.name)
            else:
                log.info("stage %s: finished earlier for the same inputs, skipped", stage.name)
            self.manifests[stage.name] = previous or {}
            return self.manifests[stage.name]
        storage.clear_dir(self.run.stage_dir(stage.name), keep=stage.keep)
        log.info("stage %s: running", stage.name)
        started = time.time()
        manifest = stage.run(self.cfg, self.run.at_round(stage.round), self._checkpoint_key(stage, key, earlier))
        # ``inputs_hash`` is the stage key (the name run directories have always used for it).
        manifest.update(stage=stage.name, inputs_hash=key, output_id=uuid.uuid4().hex, finished=True,
                        seconds=round(time.time() - started, 2), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.run.write_manifest(stage.name, manifest)
        self.manifests[stage.name] = manifest
        tracking.log_stage(tracked, stage.name, manifest, self.run.root)
        return manifest


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be opened (None: it exists)."""
    try:
        return None if storage.exists(path) else "does not exist"
    except OSError as err:  # a bucket that cannot be reached, or not with these credentials
        return f"cannot be reached: {err}"
