"""The ``hf`` serving engine: requests encoded one at a time, generated together, each with its own params.

``encode`` runs per request (so a prompt over the context window is that request's 400, not the batch's);
``run`` left-pads a batch of encoded jobs into one ``generate`` call. Rows differ in temperature, top-p,
seed, max_tokens and stop strings: ``PerRowSampler`` draws each row from its own generator, and
``RowTracker`` (a stopping criterion that sees every new token) ends each row on its own terms, cuts
stop strings, and hands streaming deltas out as tokens arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from bpo_ray.models.generate import PerRowSampler, eos_ids
from bpo_ray.models.prompts import TEXT_ALIGNED, adds_bos, tokenizer_of
from bpo_ray.serve.protocol import APIError, ChatRequest, Sampling


@dataclass
class Job:
    input_ids: list[int]
    token_types: dict[str, list[int]]  # per-token processor outputs (Qwen-VL's mm_token_type_ids)
    vision: dict[str, torch.Tensor]
    sampling: Sampling
    max_tokens: int  # resolved: the request's, or what the context window leaves (capped by the default)
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


class ChatEngine:
    def __init__(self, model_path: str, model_cfg=None, max_model_len: int | None = None,
                 default_max_tokens: int = 256):
        from bpo_ray.models.device import actor_device
        from bpo_ray.models.loader import load_llm, load_vlm, local_model_path

        model_path = local_model_path(model_path)
        config = AutoConfig.from_pretrained(model_path)
        self.vision = getattr(config, "vision_config", None) is not None
        self.model, self.processor = (load_vlm if self.vision else load_llm)(model_path, model_cfg,
                                                                               device=actor_device())
        self.model.eval()
        self.tokenizer = tokenizer_of(self.processor)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(text_config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or window, window)
        self.default_max_tokens = default_max_tokens
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    # ----------------------------------------------------------------------------------------- encode
    def encode(self, request: ChatRequest, on_text: Callable[[str], None] | None = None) -> Job:
        if request.images and not self.vision:
            raise APIError(400, "this model is text-only and does not accept images", param="messages",
                           code="invalid_value")
        chat = request.chat if self.vision else [
            {"role": m["role"], "content": " ".join(p["text"] for p in m["content"] if p["type"] == "text")}
            for m in request.chat]
        try:
            prompt = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            special = adds_bos(self.processor, prompt)  # as training built its prompts
            if self.vision:
                inputs = self.processor(text=[prompt], images=request.images or None, return_tensors="pt",
                                        add_special_tokens=special)
            else:
                inputs = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=special)
        except (ValueError, TypeError) as err:  # e.g. a template that rejects a role order
            raise APIError(400, f"the messages cannot be formatted for this model: {err}", param="messages",
                           code="invalid_value") from err
        input_ids = inputs["input_ids"][0].tolist()
        room = self.max_model_len - len(input_ids)
        wanted = request.sampling.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            asked = f" + {wanted} completion tokens" if wanted is not None else ""
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the "
                                f"messages take {len(input_ids)} (image tokens included){asked}",
                           param="messages", code="context_length_exceeded")
        max_tokens = wanted if wanted is not None else min(room, self.default_max_tokens)
        token_types = {k: inputs[k][0].tolist() for k in TEXT_ALIGNED[2:] if k in inputs}
        vision = {k: v for k, v in inputs.items() if k not in TEXT_ALIGNED}
        return Job(input_ids, token_types, vision, request.sampling, max_tokens, on_text)

    # -------------------------------------------------------------------------------------------- run
    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> list[Completion]:
        length = max(j.prompt_tokens for j in jobs)
        input_ids = torch.full((len(jobs), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(jobs), length), dtype=torch.long)
        token_types = {k: torch.zeros((len(jobs), length), dtype=torch.long)
                       for k in {k for j in jobs for k in j.token_types}}
        for i, job in enumerate(jobs):  # left padding: every row continues from the right edge
            n = job.prompt_tokens
            input_ids[i, length - n:] = torch.tensor(job.input_ids)
            attention[i, length - n:] = 1
            for k, values in job.token_types.items():
                token_types[k][i, length - n:] = torch.tensor(values)
        vision = {k: torch.cat([j.vision[k] for j in jobs if k in j.vision])
                  for k in {k for j in jobs for k in j.vision}}
        inputs = {"input_ids": input_ids, "attention_mask": attention, **token_types, **vision}
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}

        tracker = RowTracker(jobs, self.tokenizer, self.eos_ids)
        processors = LogitsProcessorList()
        if any(j.sampling.temperature > 0 for j in jobs):
            processors.append(PerRowSampler([j.sampling.seed for j in jobs], [j.sampling.temperature for j in jobs],
                                            [j.sampling.top_p for j in jobs]))
        self.model.generate(**inputs, do_sample=False, max_new_tokens=max(j.max_tokens for j in jobs),
                            logits_processor=processors, stopping_criteria=StoppingCriteriaList([tracker]),
                            pad_token_id=self.pad_id)
        return tracker.completions()


class RowTracker(StoppingCriteria):
    """Follows every row's new tokens: ends a row at end of turn, its max_tokens, a stop string or a
    cancelled client; emits streaming text deltas (held back while they could still become a stop string)."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.done = [False] * len(jobs)
        self.finish = ["length"] * len(jobs)
        self.text = [""] * len(jobs)
        self.sent = [0] * len(jobs)  # characters of text already streamed
        self.generated = [0] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if self.done[i]:
                continue
            self.generated[i] += 1
            if last[i] in self.eos_ids:
                self._end(i, "stop")
                continue
            self.tokens[i].append(last[i])
            self.text[i] = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True).lstrip()
            cut = _first_stop(self.text[i], job.sampling.stop)
            if cut is not None:
                self.text[i] = self.text[i][:cut]
                self._end(i, "stop")
            elif self.generated[i] >= job.max_tokens:
                self._end(i, "length")
            elif job.cancelled.is_set():
                self._end(i, "cancelled")
            else:
                self._emit(i, final=False)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _end(self, i: int, reason: str) -> None:
        self.done[i], self.finish[i] = True, reason
        self._emit(i, final=True)

    def _emit(self, i: int, final: bool) -> None:
        job = self.jobs[i]
        if job.on_text is None:
            return
        text = self.text[i]
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                return
            hold = max((len(s) - 1 for s in job.sampling.stop), default=0)
            end = max(self.sent[i], end - hold)
        if end > self.sent[i]:
            job.on_text(text[self.sent[i]:end])
            self.sent[i] = end

    def completions(self) -> list[Completion]:
        out = []
        for i, job in enumerate(self.jobs):
            if not self.done[i]:  # generate stopped at the batch's longest max_tokens
                self._end(i, "length")
            out.append(Completion(self.text[i], self.finish[i], job.prompt_tokens, self.generated[i]))
        return out


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None
