"""The config's sections: one pydantic model per stage's concern, each forbidding unknown keys, and
``RunConfig`` holding them all. Comments say what a field does; ``json_schema_extra`` markers say how it takes
part in the stage keys (``config/keys.py``)."""

from __future__ import annotations

import os
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from bpo_ray.config.checks import impossible_combinations
from bpo_ray.config.keys import KEYED_IF_SET, NO_LONGER_KEYED, NOT_KEYED, section_hash


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# A local path, a URI, or (where the field says so) a hub id. A leading ``~`` is the home directory, as in a
# shell: nothing downstream expands it (pyarrow, Ray, transformers), so ``storage_path: ~/runs`` made a folder
# named ``~`` in the working directory. Expanded here, once: the saved config and the stage keys hold the path.
PathStr = Annotated[str, AfterValidator(os.path.expanduser)]


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    """The policy MLLM: a hub id, a local directory, or ``tiny://llava`` / ``tiny://qwen2_vl``."""

    name_or_path: PathStr = "tiny://llava"
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The attention kernel every loader asks transformers for: "sdpa", "flash_attention_2" (where flash-attn
    # is installed), "eager". How attention is computed, not what: outside the stage keys (NOT_KEYED).
    attn_implementation: str = Field("sdpa", json_schema_extra=NOT_KEYED)
    # Prompt + response tokens; image placeholder tokens count, and are never truncated.
    max_length: int = Field(2048, ge=16)
    # An over-long sample keeps at least this many response tokens, else it is skipped with a reason.
    min_response_tokens: int = Field(1, ge=1)


# ----------------------------------------------------------------------------------------------- data
class SyntheticDataConfig(Section):
    """The bundled procedural "shapes" dataset (bpo make-data)."""

    num_images: int = Field(64, ge=1)
    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    max_objects: int = Field(3, ge=1, le=6)
    # Language prior: how often a "companion" object accompanies its anchor (see data/synthetic.py).
    cooccurrence: float = Field(0.8, ge=0.0, le=1.0)
    # How often an image is built around an anchor object (0: anchors are as common as any other object).
    anchor_rate: float = Field(0.0, ge=0.0, le=1.0)
    # How often an anchor shown without its companion is annotated as if the companion were there (web-caption
    # noise that follows the prior). For SFT data that should teach the prior; keep 0 for BPO data and eval.
    caption_prior: float = Field(0.0, ge=0.0, le=1.0)
    # How often an image with an anchor but not its companion is also asked about both (yes, then no), as
    # negative instructions ask about plausible absent objects. For BPO data: pairs where the prior says yes.
    companion_questions: float = Field(0.0, ge=0.0, le=1.0)
    qa_per_image: int = Field(2, ge=0, le=8)


class DataConfig(Section):
    format: Literal["synthetic", "llava_json", "parquet", "hf_disk"] = "synthetic"
    # File or directory for llava_json (.json/.jsonl), parquet, or a datasets.save_to_disk folder.
    path: PathStr | None = None
    # Where relative image paths of llava_json records resolve (local path or pyarrow-filesystem URI).
    image_root: PathStr | None = None
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    # Decompression-bomb guard: images with more pixels are rejected before decoding.
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_records: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _source_is_complete(self) -> DataConfig:
        if self.format != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.format is {self.format!r}")
        if self.format == "synthetic" and self.path:
            raise ValueError("data.path is set but data.format is 'synthetic'; set data.format to read it")
        return self


# ------------------------------------------------------------------------------------------ negatives
class DistortionConfig(Section):
    kind: Literal["diffusion", "gaussian", "blur", "crop", "mask"] = "diffusion"
    # diffusion: forward-noise step in [0, 999] (paper default 900).
    step: int = Field(900, ge=0, le=999)
    # gaussian: noise std on [0,1] pixels; blur: radius in pixels; crop/mask: fraction of the image.
    strength: float = Field(0.5, ge=0.0)


class SamplingConfig(Section):
    temperature: float = Field(0.2, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)


class ActorPoolConfig(Section):
    """Ray Data actor-pool size (min, max): grows on autoscaling clusters. What each actor needs (CPUs,
    GPUs, accelerator type, memory) is what the autoscaler brings nodes up for (bpo_ray/resources.py)."""

    # Where and how wide it runs is not what it computes (rows are seeded one by one, whatever the batch):
    # outside the stage keys. num_gpus is in them: a GPU generates and scores in another precision.
    min_size: int = Field(1, ge=1, json_schema_extra=NO_LONGER_KEYED)
    max_size: int = Field(1, ge=1, json_schema_extra=NO_LONGER_KEYED)
    batch_size: int = Field(8, ge=1, json_schema_extra=NO_LONGER_KEYED)
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0, json_schema_extra=NO_LONGER_KEYED)
    accelerator_type: str | None = Field(None, json_schema_extra=NO_LONGER_KEYED)  # e.g. "L4": only nodes with that GPU
    memory_gb: float | None = Field(None, gt=0.0, json_schema_extra=NO_LONGER_KEYED)

    @model_validator(mode="after")
    def _min_le_max(self) -> ActorPoolConfig:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) > max_size ({self.max_size})")
        return self


class WeakeningConfig(Section):
    enabled: bool = True
    engine: Literal["hf", "vllm"] = "hf"
    distortions: list[DistortionConfig] = Field(default_factory=lambda: [DistortionConfig()])
    sampling: SamplingConfig = SamplingConfig()
    pool: ActorPoolConfig = ActorPoolConfig()


class InjectionConfig(Section):
    enabled: bool = True
    engine: Literal["rules", "hf", "vllm"] = "rules"
    # Text LLM that rewrites answers (engines hf / vllm): hub id, path, or tiny://llm.
    model: PathStr = "tiny://llm"
    mode: Literal["description", "qa", "auto"] = "auto"
    # The rules engine's words (negatives/vocabulary.py): general (COCO's categories, colours, counts,
    # spatial relations), shapes (the bundled data's own), or a JSON file (COCO categories or our layout).
    # auto: shapes for data.format synthetic, general otherwise.
    vocabulary: PathStr = Field("auto", min_length=1, json_schema_extra=KEYED_IF_SET)
    sampling: SamplingConfig = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=256)
    pool: ActorPoolConfig = ActorPoolConfig()


class ExistenceConfig(Section):
    """Balanced yes/no pairs about objects, from the training images' object annotations (not in the paper: off
    here and in the real configs; the embedded default steers them over two rounds). Per image, each object
    present ("yes" chosen) and as many absent ones ("no" chosen). Switched off, its other settings are inert."""

    enabled: bool = False
    # A COCO instances file for the training images (image_ref matched by path or file name); None: the
    # bundled shapes' own truth (data.format synthetic).
    annotations: PathStr | None = None
    strategies: list[Literal["random", "popular", "adversarial"]] = Field(
        ["random", "popular", "adversarial"], min_length=1)
    # existence: yes and no chosen one to one among these pairs. mix: over every yes/no pair the run makes
    # (weakening argues only for "no"), by dropping the existence pairs on the side that has more. errors:
    # only the questions the policy answers wrong on the clean image (greedy, as the eval asks), so the pairs
    # lean the way the policy's own yes/no bias needs correcting: BPO's bootstrapping, applied to existence.
    # steer: as mix, to a yes-chosen share of one half moved against the policy's bias (steer_gain times how
    # much more or less often it says yes than the truth, on the clean training images, at most 0.1 off),
    # dropping first the pairs it answers right.
    balance: Literal["existence", "mix", "errors", "steer"] = Field("existence", json_schema_extra=KEYED_IF_SET)
    # The yes-ratio follows the pairs' share steeply: on the demo's base, the whole bias (gain 1) took it from
    # 0.58 (mix) to 0.29 where the truth is 0.50 (docs/results.md); 0.3 is where a line through the two meets it.
    steer_gain: float = Field(0.3, gt=0, le=1, json_schema_extra=KEYED_IF_SET)


class PairsConfig(Section):
    """Preference pairs that already exist (``data/preferences.py``): TRL's vision format, RLAIF-V's, or
    scored completions (VLFeedback, the BPO authors' release), validated as records are."""

    # A .json/.jsonl file, parquet file(s), a datasets.save_to_disk folder, or a load_dataset name.
    path: PathStr = Field(min_length=1)
    format: Literal["auto", "json", "jsonl", "parquet", "hf_disk", "hub"] = "auto"
    layout: Literal["auto", "trl", "rlaif_v", "completions"] = "auto"
    image_root: PathStr | None = None  # where relative image paths resolve
    split: str = "train"           # for hf_disk (a DatasetDict) and hub
    max_rows: int | None = Field(None, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1)


class NegativesConfig(Section):
    weakening: WeakeningConfig = WeakeningConfig()
    injection: InjectionConfig = InjectionConfig()
    existence: ExistenceConfig = Field(ExistenceConfig(), json_schema_extra=KEYED_IF_SET)
    # Existing pairs trained beside the bootstrapped ones (or alone: bpo train --pairs PATH turns the
    # bootstrapping branches off); the manifest's by_type.external says how many came in and which failed.
    extra_pairs: PairsConfig | None = Field(None, json_schema_extra=KEYED_IF_SET)
    # Samples with any response longer than this (words) are dropped, as in the paper.
    max_words: int = Field(350, ge=1)
    # A generated negative cut at max_new_tokens (it never ended): "drop" records it in errors/ (reason
    # "truncated"); "keep" pairs it without an end-of-sequence token. Never with one: "half an answer, then
    # stop" would be an easy rejected answer for DPO to learn from.
    truncated: Literal["drop", "keep"] = "drop"
    seed: int = 0


# ---------------------------------------------------------------------------------------------- train
class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(32, ge=1)
    alpha: int = Field(256, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(Section):
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0.0)
    # The anchor of mDPO: + anchor_weight × −log σ(β·(π_c − ref_c) − anchor_margin), so DPO cannot win by
    # lowering the chosen answer's likelihood along with the rejected one's (0: off, as in the paper).
    anchor_weight: float = Field(0.0, ge=0.0, json_schema_extra=KEYED_IF_SET)
    anchor_margin: float = Field(0.0, json_schema_extra=KEYED_IF_SET)
    # The conditional preference of mDPO: + image_weight × −log σ(β·((π_c − ref_c) − (π_c|weak − ref_c|weak))),
    # the chosen answer preferred on the original image over the same answer on the weakened image
    # (negatives.weakening.distortions, seeded per sample: the image its weakening negative came from). 0: off.
    image_weight: float = Field(0.0, ge=0.0, json_schema_extra=KEYED_IF_SET)
    # The worse image of that term, if not the weakening negatives' own (None). Diffusion step 900 leaves
    # almost pure noise, easy to tell from any picture; mDPO's worse image is a crop that keeps under 20%
    # of the picture: [{kind: crop, strength: 0.85}].
    image_distortions: list[DistortionConfig] | None = Field(None, json_schema_extra=KEYED_IF_SET)
    # precomputed: reference log-probs in a Ray Data pass before training (default);
    # live: a frozen reference model on every worker; adapter_disabled: the LoRA policy without adapters.
    reference: Literal["precomputed", "live", "adapter_disabled"] = "precomputed"
    lr: float = Field(2e-6, gt=0.0)
    # Learning rate of the vision tower where it trains (None: lr), like LLaVA's mm_vision_tower_lr. The
    # projector trains at lr.
    vision_lr: float | None = Field(None, gt=0.0)
    epochs: float = Field(2.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Rows each worker mixes before batching, reseeded every epoch (0: the same order every epoch).
    shuffle_buffer: int = Field(1024, ge=0)
    # Host memory (GiB) each worker keeps its rows' encodings in (token ids, image tensors) so later epochs
    # skip fetching, decoding and tokenising them again; 0: encode every epoch. Same results either way.
    encode_cache_gib: float = Field(1.0, ge=0.0, json_schema_extra=NOT_KEYED)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Activations recomputed in the backward pass: memory for time, the same gradients.
    gradient_checkpointing: bool = Field(True, json_schema_extra=NO_LONGER_KEYED)
    freeze_vision_tower: bool = True
    # None: trained in full fine-tuning, frozen under LoRA (only the adapter trains). False with LoRA: trained
    # in full beside the adapter, as LLaVA's LoRA recipe trains its projector.
    freeze_projector: bool | None = None
    lora: LoraConfig = LoraConfig()
    # The Ray Data pass that scores reference log-probs once, before training (reference: precomputed).
    # (the reference stage's pool: training never reads it)
    reference_pool: ActorPoolConfig = Field(ActorPoolConfig(batch_size=4), json_schema_extra=NO_LONGER_KEYED)
    num_workers: int = Field(2, ge=1)
    # How often it checkpoints and how many it keeps or retries: a changed cadence resumes the same run.
    checkpoint_every: int = Field(50, ge=1, json_schema_extra=NO_LONGER_KEYED)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=NO_LONGER_KEYED)
    max_failures: int = Field(2, ge=0, json_schema_extra=NO_LONGER_KEYED)
    merge_lora_on_export: bool = True
    seed: int = 0


# ------------------------------------------------------------------------------------------------ sft
class SFTConfig(Section):
    """Supervised fine-tuning before BPO: trains the base that BPO then aligns (a user with an SFT checkpoint
    leaves this off and points model.name_or_path at it). Same Ray Train × DeepSpeed machinery as DPO;
    full fine-tuning by default, since a model built from config starts random."""

    enabled: bool = False
    # What to fine-tune on: any data source the data stage reads (the demo: a larger shapes set).
    data: DataConfig = DataConfig(synthetic=SyntheticDataConfig(num_images=1500, seed=7))
    lr: float = Field(2e-3, gt=0.0)
    vision_lr: float | None = Field(None, gt=0.0)  # as train.vision_lr
    epochs: float = Field(3.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    per_device_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    shuffle_buffer: int = Field(1024, ge=0)
    encode_cache_gib: float = Field(1.0, ge=0.0, json_schema_extra=NOT_KEYED)  # as train's
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 2, 3] = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = Field(False, json_schema_extra=NO_LONGER_KEYED)  # as train's
    freeze_vision_tower: bool = False
    lora: LoraConfig = LoraConfig(enabled=False)
    num_workers: int = Field(2, ge=1)
    checkpoint_every: int = Field(200, ge=1, json_schema_extra=NO_LONGER_KEYED)  # as train's: outside the stage keys
    keep_checkpoints: int = Field(1, ge=1, json_schema_extra=NO_LONGER_KEYED)
    max_failures: int = Field(2, ge=0, json_schema_extra=NO_LONGER_KEYED)
    seed: int = 0

    def as_train(self) -> TrainConfig:
        """The DPO trainer's settings for this run: one worker loop and one DeepSpeed config serve both."""
        shared = set(TrainConfig.model_fields) & set(type(self).model_fields)
        return TrainConfig(**{k: getattr(self, k) for k in shared}, freeze_projector=False, reference="precomputed")


# ---------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    engine: Literal["hf", "vllm"] = "hf"
    # Loopback by default: reach a remote head with port forwarding; any other address needs api_key.
    # Where it listens, how many replicas and what they admit: how the eval stage serves, not what the models
    # answer, so outside its stage key (engine, context, lengths and image limits are in it).
    host: str = Field("127.0.0.1", json_schema_extra=NO_LONGER_KEYED)
    port: int = Field(8000, ge=1, le=65535, json_schema_extra=NO_LONGER_KEYED)
    model_id: str = Field("bpo-aligned", min_length=1, json_schema_extra=NO_LONGER_KEYED)
    # Replicas: min == max is a fixed count; min < max autoscales on ongoing requests per replica.
    min_replicas: int = Field(1, ge=0, json_schema_extra=NO_LONGER_KEYED)
    max_replicas: int = Field(1, ge=1, json_schema_extra=NO_LONGER_KEYED)
    target_ongoing_requests: float = Field(4.0, gt=0.0, json_schema_extra=NO_LONGER_KEYED)
    # Admission: per replica at once, then a bounded queue per proxy; past both, 503 with Retry-After.
    max_ongoing_requests: int = Field(32, ge=1, json_schema_extra=NO_LONGER_KEYED)
    max_queued_requests: int = Field(64, ge=0, json_schema_extra=NO_LONGER_KEYED)
    retry_after_s: float = Field(1.0, ge=0.0, json_schema_extra=NO_LONGER_KEYED)
    # Dynamic batching (hf engine): up to this many requests per generate call; 1 disables it. The wait must
    # outlast a client's round trip: with 20 ms, 16 closed-loop clients split into two cohorts that never
    # shared a batch (2.5x unbatched on the 77M model; 50 ms: 5.6x, at the engine's ceiling). At low load a
    # request waits up to this long.
    max_batch_size: int = Field(8, ge=1, json_schema_extra=NO_LONGER_KEYED)
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, json_schema_extra=NO_LONGER_KEYED)
    # Context window (None: the model's); completion length when a request does not say.
    max_model_len: int | None = Field(None, ge=16)
    default_max_tokens: int = Field(256, ge=1)
    api_key: str | None = Field(None, json_schema_extra=NO_LONGER_KEYED)
    # Images: data: URLs always; file:// only under local_image_root; http(s) only when allowed.
    local_image_root: PathStr | None = None
    allow_remote_images: bool = False
    max_images_per_request: int = Field(1, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    num_cpus_per_replica: float = Field(1.0, gt=0.0, json_schema_extra=NO_LONGER_KEYED)
    num_gpus_per_replica: float = Field(0.0, ge=0.0)
    accelerator_type: str | None = Field(None, json_schema_extra=NO_LONGER_KEYED)
    memory_gb_per_replica: float | None = Field(None, gt=0.0, json_schema_extra=NO_LONGER_KEYED)

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


# ----------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    enabled: bool = True
    # Serve and score the base beside the aligned model (a sweep over one base scores it once).
    base: bool = True
    pope_splits: list[Literal["random", "popular", "adversarial"]] = Field(
        default_factory=lambda: ["random", "popular", "adversarial"]
    )
    # Held-out synthetic images: the training generator's settings with this seed (never the data seed).
    num_images: int = Field(50, ge=1)
    seed: int = 1234
    # Companion rate of the held-out images (None: the training data's). Lower than in training, more
    # images show an anchor without its companion: the case that tells a grounded model from its prior.
    cooccurrence: float | None = Field(None, ge=0.0, le=1.0)
    concurrency: int = Field(16, ge=1, json_schema_extra=NO_LONGER_KEYED)  # requests in flight: how fast, not what is scored
    # Optional COCO-format annotation file for POPE on real images.
    coco_annotations: PathStr | None = None
    coco_image_root: PathStr | None = None


# --------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    """What happens to the aligned model (``model/``) once the run is done: its card is always written."""

    # A Hub repo ("user/name") to push the model and its card to at the end of the run (None: no push).
    push_to_hub: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    private: bool = True


# ------------------------------------------------------------------------------------------- tracking
class MlflowConfig(Section):
    # None: what the driver's MLflow resolves (MLFLOW_TRACKING_URI, or its default); a relative local path
    # is made absolute there. Training workers log to the same URI, so it must be reachable from them.
    tracking_uri: PathStr | None = None
    experiment: str = Field("bpo-ray", min_length=1)


class WandbConfig(Section):
    project: str = Field("bpo-ray", min_length=1)
    entity: str | None = None
    # offline: runs are written under ``dir`` (or WANDB_DIR) and uploaded later with ``wandb sync``.
    mode: Literal["online", "offline"] = "online"
    dir: PathStr | None = None


class TrackingConfig(Section):
    """Experiment trackers a run logs to (off unless a backend is set; ``pip install 'bpo-ray[tracking]'``).
    No stage reads this section: switching tracking on never re-runs a finished stage."""

    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None


# ------------------------------------------------------------------------------------------ resources
class ResourcesConfig(Section):
    # Ray address: None starts a private local cluster when none is running; "auto" joins a running one.
    ray_address: str | None = None
    use_gpu: bool = False
    # Logical CPUs for a local cluster (Ray Data actors each take one; more than cores is fine).
    local_num_cpus: int | None = Field(None, ge=1)
    # What each training worker needs (the other stages say so in their own pool / serve sections).
    accelerator_type: str | None = None
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    memory_gb_per_worker: float | None = Field(None, gt=0.0)


# ------------------------------------------------------------------------------------------------ run
class RunConfig(Section):
    run_name: str = Field("bpo-tiny", pattern=r"^[A-Za-z0-9._-]+$")
    # Where run directories live: a local path or a pyarrow-filesystem URI (s3://, gs://).
    storage_path: PathStr = "runs"
    # Built tiny models and bundled data are cached here so every run reuses them.
    cache_dir: PathStr = ".cache/bpo-ray"
    seed: int = 0
    # Bootstrapping rounds: round k+1 makes its weakened-image negatives with round k's aligned model (the
    # model's current prior), scores them with it as the reference and trains on from it (1: the paper's one
    # round). Round 1 is the same whatever this says, so a finished run can be extended with more rounds.
    rounds: int = Field(1, ge=1, le=20)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    negatives: NegativesConfig = NegativesConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _combinations_that_cannot_work(self) -> RunConfig:
        problems = list(impossible_combinations(self))
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def section_hash(self, *sections: str, earlier: bool = False) -> str:
        """``keys.section_hash`` of these sections or fields (``train``, ``train.loss``)."""
        return section_hash(self, *sections, earlier=earlier)
