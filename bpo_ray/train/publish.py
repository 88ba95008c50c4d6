"""Publishing the aligned model: its card (``model/README.md``, the Hub's model card) and the push to the Hub.

The card says what a reader of a Hub page needs to trust or reproduce the model: the base it was aligned
from, the pairs by type (bootstrapped and external), the training settings and result, and the
base-vs-aligned evaluation table. ``model_card`` is a pure function of the run's manifests; the report
stage writes it once every stage has run, and pushes when ``export.push_to_hub`` names a repo.
"""

from __future__ import annotations

import json
import re

from bpo_ray.config import RunConfig
from bpo_ray.eval.compare import format_table

TRAIN_SETTINGS = ("loss", "beta", "lr", "epochs", "per_device_batch_size", "gradient_accumulation_steps",
                  "sft_weight", "anchor_weight", "image_weight", "reference", "zero_stage", "precision", "seed")


def model_card(cfg: RunConfig, manifests: dict, comparison: list[dict], base: str) -> str:
    """``README.md`` of the exported model: Hub metadata, then data, training and evaluation."""
    negatives = manifests.get("negatives", {})
    train = manifests.get("train", {})
    final = train.get("final_metrics", {})
    lora = cfg.train.lora
    meta = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
            "tags": ["bpo", "dpo", "preference-optimization", "multimodal", "bpo-ray"]}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base):  # the Hub links a base model by its id only
        meta = {"base_model": base, **meta}
    lines = ["---", *[f"{k}: {json.dumps(v)}" for k, v in meta.items()], "---", "",
             f"# {cfg.run_name}", "",
             f"`{base}` aligned with Bootstrapped Preference Optimization (BPO, Pi et al., ECCV 2024) by "
             f"bpo-ray: DPO on preference pairs whose rejected answers the model itself "
             f"gave on weakened images, or that injected errors into the annotated answers.", "",
             "## Data", "",
             f"{negatives.get('pairs', 0)} preference pairs from {negatives.get('samples_in', 0)} samples "
             f"(`{cfg.data.path or 'bundled synthetic shapes'}`):", "",
             "| pairs | type | made by |", "|---:|---|---|"]
    for kind, counts in negatives.get("by_type", {}).items():
        lines.append(f"| {counts.get('pairs', 0)} | {kind} | `{counts.get('generator', '')}` |")
    rounds = f", {cfg.rounds} bootstrapping rounds" if cfg.rounds > 1 else ""
    adapter = f"LoRA r {lora.r}, alpha {lora.alpha}, merged into the weights" if lora.enabled else "full fine-tuning"
    lines += ["", "## Training", "",
              f"{train.get('steps', 0)} steps on {train.get('workers', 0)} workers (Ray Train × DeepSpeed ZeRO-"
              f"{cfg.train.zero_stage}), {adapter}{rounds}; final loss {final.get('loss', float('nan')):.4f}, reward "
              f"margin {final.get('reward_margin', float('nan')):.4f}, reward accuracy "
              f"{final.get('reward_accuracy', float('nan')):.2f}.", "",
              "| setting | value |", "|---|---|",
              *[f"| train.{k} | {getattr(cfg.train, k)} |" for k in TRAIN_SETTINGS], "",
              "## Evaluation", ""]
    if comparison:
        images = manifests.get("eval", {}).get("metrics", {}).get("aligned", {}).get("images")
        lines += [f"Base vs aligned on {images} held-out images, greedy decoding (✓: aligned better):", "",
                  format_table(comparison), ""]
    else:
        lines += ["Not evaluated against the base in this run.", ""]
    return "\n".join(lines)


def push_to_hub(model_dir: str, repo_id: str, private: bool) -> str:
    """Upload the model folder (weights, processor, card) to ``repo_id``; the repo's URL. Any failure (no
    network, no token, no permission) is one clear error saying where the model still is."""
    from huggingface_hub import HfApi

    from bpo_ray import storage

    local = storage.local_dir(model_dir)
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=local, repo_id=repo_id, repo_type="model",
                                   commit_message="bpo-ray: aligned model and card")
    except Exception as err:  # huggingface_hub raises many kinds: offline, HTTP, auth, validation
        raise RuntimeError(
            f"export.push_to_hub: could not upload {model_dir} to the Hub repo {repo_id!r} "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). Log in (`hf auth login` "
            f"or HF_TOKEN) and check network access; the model and its card stay in {model_dir}, and re-running "
            f"the job retries only the report stage's push.") from err
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"
