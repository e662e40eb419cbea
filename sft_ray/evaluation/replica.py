"""One model replica of the generation pool: a Ray Data actor that answers batches of prompts
with the base model and the tuned one, and scores both on the references.

Heavy imports (torch, transformers, peft, vllm) happen here, inside the actor. A PEFT adapter is
put on the base once and switched off for the base's answers (`disable_adapter`), so the base is
loaded once; a fully fine-tuned model (`lora: null`) is a second model next to the base. With
`eval.engine: vllm` (GPUs), vLLM serves the base and the adapter as a LoRA request.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pyarrow as pa

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.evaluation.metrics import MODELS, example

# Logits of the reference positions are computed in slices of at most this many floats (512 MiB):
# 16 references of 500 tokens over a 128k vocabulary would take 4 GiB at once.
LOGIT_BUDGET = 2**27


class _Scoring:
    """What both engines share: the tokenizer the data was prepared with, the stop ids, and the
    table of answers and per-example metrics built from each model's answers and losses."""

    def _setup(self, config: dict, tuned_dir: str, formats: dict[str, list[str]], loud: bool) -> str:
        """Returns a local folder with the tuned weights (downloaded when in object storage)."""
        from sft_ray.chat_format import template_text
        from sft_ray.console import quiet_worker
        from sft_ray.export import RESUME_ONLY
        from sft_ray.model import load_tokenizer
        from sft_ray.train.final import next_turn_markers, stop_ids

        quiet_worker(loud)
        cfg = Config.model_validate(config)
        self.cfg, self.e = cfg, cfg.eval
        # The tokenizer the data was prepared with (final/ saves the same one).
        template = template_text(cfg.data.chat_template)
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template)
        self.stops = sorted({t for f in formats.values() for t in stop_ids(cfg, self.tokenizer, set(f))})
        self.next_turn = {s: next_turn_markers(cfg, self.tokenizer, set(f)) for s, f in formats.items()}
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if storage.is_local(tuned_dir):
            return tuned_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="sft-ray-eval-")
        return storage.download_dir(tuned_dir, self._tmp.name, skip=RESUME_ONLY)

    def _cut(self, tokens: list[int]) -> list[int]:
        """An answer up to and with its first stop token (what follows is padding)."""
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.stops), len(tokens))
        return tokens[:end]

    def _table(self, rows: list[dict], answers: dict[str, list[list[int]]], losses: dict[str, list[float]]):
        references = [r["reference_ids"] for r in rows]
        out = {
            "set": [r["set"] for r in rows],
            "index": [r["index"] for r in rows],
            "prompt": [self.tokenizer.decode(r["prompt_ids"]) for r in rows],
            "reference": [self.tokenizer.decode(r) for r in references],
            "reference_tokens": [len(r) for r in references],
            "replica": [self.name] * len(rows),
        }
        answer_ref = [self.tokenizer.decode(r, skip_special_tokens=True) for r in references]
        for which in MODELS:
            out[f"{which}_output"] = [self.tokenizer.decode(g) for g in answers[which]]
            out[f"{which}_output_tokens"] = [len(g) for g in answers[which]]
            out[f"{which}_loss"] = losses[which]
            for i, g in enumerate(answers[which]):
                stopped = bool(g) and g[-1] in self.stops
                clean = stopped and not any(m in out[f"{which}_output"][i] for m in self.next_turn[rows[i]["set"]])
                answer = self.tokenizer.decode(g, skip_special_tokens=True)
                for key, value in example(answer, answer_ref[i], clean).items():
                    out.setdefault(f"{which}_{key}", []).append(value)
        return pa.table(out)


class Replica(_Scoring):
    """The transformers engine: `generate` in left-padded batches, any model sft-ray trains."""

    def __init__(self, config: dict, tuned_dir: str, formats: dict[str, list[str]], loud: bool = False):
        local = self._setup(config, tuned_dir, formats, loud)
        import torch
        from transformers import AutoModelForCausalLM

        from sft_ray.model import load_model

        cfg = self.cfg
        use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets the visible GPU
        # Loaded as training loaded it (4-bit for QLoRA, embeddings fitted to the tokenizer), whole on this device.
        whole = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"strategy": "ddp"})})
        base = load_model(whole, self.device, self.tokenizer)
        if os.path.exists(os.path.join(local, "adapter_config.json")):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(base, local).eval()
            self.base = None
        else:  # lora: null, final/ is a whole model
            self.base = base.eval()
            whole_model = AutoModelForCausalLM.from_pretrained(
                local, dtype=base.dtype, trust_remote_code=cfg.model.trust_remote_code
            )
            self.model = whole_model.to(self.device).eval()

    def _switched(self, which: str):
        """The model that answers as `which`, and the context it answers in."""
        import contextlib

        if which == "tuned":
            return self.model, contextlib.nullcontext()
        if self.base is not None:
            return self.base, contextlib.nullcontext()
        return self.model, self.model.disable_adapter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pylist()
        prompts = [r["prompt_ids"] for r in rows]
        answers, losses = {}, {}
        for which in MODELS:
            model, context = self._switched(which)
            with torch.no_grad(), context:
                answers[which] = self._generate(model, prompts, rows[0]["index"])
                losses[which] = self._losses(model, prompts, [r["reference_ids"] for r in rows])
        return self._table(rows, answers, losses)

    def _generate(self, model, prompts: list[list[int]], first_index: int) -> list[list[int]]:
        """Left-padded batch generation; each answer cut after its first stop token (pads follow it)."""
        import torch

        from sft_ray.model import plain_generation

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampled = self.e.temperature > 0
        if sampled:  # the same answers for the same prompts, whichever replica gets them
            torch.manual_seed(self.e.seed + first_index)
        config = plain_generation(self.e.max_new_tokens, self.e.temperature, pad, self.stops)
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
        return [self._cut(tokens) for tokens in new]

    def _losses(self, model, prompts: list[list[int]], references: list[list[int]]) -> list[float]:
        """Mean negative log-likelihood of each reference after its prompt (teacher-forced).

        Left-padded, with position ids from the mask (as generate computes them), so that padding
        changes nothing; only the logits of reference positions are computed, in slices."""
        import torch
        import torch.nn.functional as F

        vocab = model.get_output_embeddings().weight.shape[0]
        losses: list[float] = []
        i = 0
        while i < len(prompts):
            keep = max(len(references[i]), 1) + 1
            j = i + 1
            while j < len(prompts) and (j - i + 1) * (max(keep, len(references[j]) + 1)) * vocab <= LOGIT_BUDGET:
                keep = max(keep, len(references[j]) + 1)
                j += 1
            seqs = [p + r for p, r in zip(prompts[i:j], references[i:j])]
            width = max(len(s) for s in seqs)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = min(keep, width)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
            targets = ids[:, width - keep + 1 :].clone()
            for row, ref in enumerate(references[i:j]):
                targets[row, : keep - 1 - len(ref)] = -100  # prompt tokens among the kept positions
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
            losses += [float(nll[row].sum() / max(len(ref), 1)) for row, ref in enumerate(references[i:j])]
            i = j
        return losses


# LoRA ranks vLLM accepts for `max_lora_rank`.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VllmReplica(_Scoring):
    """The vLLM engine (`eval.engine: vllm`, GPUs, the `vllm` extra): the base served once, the
    adapter as a LoRA request for the tuned answers; the reference losses from vLLM's prompt
    log-probabilities of prompt + reference. Configs it cannot serve (a whole fine-tuned model,
    ChatML's trained token rows) are refused at config time."""

    def __init__(self, config: dict, tuned_dir: str, formats: dict[str, list[str]], loud: bool = False):
        local = self._setup(config, tuned_dir, formats, loud)
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise ImportError(
                f"eval.engine=vllm: vllm is not installed on {socket.gethostname()} (pip install 'sft-ray[vllm]')"
            ) from None
        cfg, e = self.cfg, self.e
        self.llm = LLM(
            model=cfg.model.path,
            # Only for vLLM's own text: prompts go in as token ids and answers are decoded with self.tokenizer.
            tokenizer=cfg.model.path,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype="auto" if cfg.model.dtype == "auto" else cfg.model.dtype,
            quantization="bitsandbytes" if cfg.quantization is not None else None,
            enable_lora=True,
            max_lora_rank=next(r for r in VLLM_RANKS if r >= cfg.lora.r),
            max_model_len=min(cfg.data.max_length + e.max_new_tokens, _positions(cfg)),
            seed=e.seed,
            # Off: with it, prompt log-probabilities can change with the order of requests sharing a
            # prefix (vllm-project/vllm#42019), and every prompt here is answered once per model anyway.
            enable_prefix_caching=False,
        )
        self.lora = {"base": None, "tuned": LoRARequest("tuned", 1, local)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm import SamplingParams

        rows = batch.to_pylist()
        e = self.e
        answer = SamplingParams(
            max_tokens=e.max_new_tokens,
            temperature=e.temperature,
            seed=e.seed + rows[0]["index"] if e.temperature > 0 else None,
            stop_token_ids=self.stops,
        )
        score = SamplingParams(max_tokens=1, prompt_logprobs=0)  # the log-probability of every prompt token
        prompts = [{"prompt_token_ids": r["prompt_ids"]} for r in rows]
        whole = [{"prompt_token_ids": r["prompt_ids"] + r["reference_ids"]} for r in rows]
        answers, losses = {}, {}
        for which in MODELS:
            outs = self.llm.generate(prompts, answer, lora_request=self.lora[which], use_tqdm=False)
            answers[which] = [self._answer(o.outputs[0]) for o in outs]
            scored = self.llm.generate(whole, score, lora_request=self.lora[which], use_tqdm=False)
            losses[which] = [
                -sum(o.prompt_logprobs[i][t].logprob for i, t in enumerate(r["reference_ids"], len(r["prompt_ids"])))
                / max(len(r["reference_ids"]), 1)
                for o, r in zip(scored, rows)
            ]
        return self._table(rows, answers, losses)

    def _answer(self, out) -> list[int]:
        """The answer's tokens with the stop token that ended it, also if vLLM left it out of them."""
        tokens = list(out.token_ids)
        if isinstance(out.stop_reason, int) and (not tokens or tokens[-1] != out.stop_reason):
            tokens.append(out.stop_reason)  # one of stop_token_ids, which vLLM may leave out of the tokens
        return self._cut(tokens)


def _positions(cfg: Config) -> int:
    """The model's max positions (vLLM refuses a longer max_model_len)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return getattr(config, "max_position_embeddings", None) or 10**9
