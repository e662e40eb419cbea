"""One model replica of the generation pool: a Ray Data actor that answers batches of prompts
with the base model and the tuned one, and scores both on the references.

Heavy imports (torch, transformers, peft) happen here, inside the actor. A PEFT adapter is put
on the base once and switched off for the base's answers (`disable_adapter`), so the base is
loaded once; a fully fine-tuned model (`lora: null`) is a second model next to the base.
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


class Replica:
    def __init__(self, config: dict, tuned_dir: str, formats: dict[str, list[str]], loud: bool = False):
        from sft_ray.console import quiet_worker

        quiet_worker(loud)
        import torch
        from transformers import AutoModelForCausalLM

        from sft_ray.chat_format import template_text
        from sft_ray.export import RESUME_ONLY
        from sft_ray.model import load_model, load_tokenizer
        from sft_ray.train.final import next_turn_markers, stop_ids

        cfg = Config.model_validate(config)
        self.cfg, self.e = cfg, cfg.eval
        use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets the visible GPU
        # The tokenizer the data was prepared with (final/ saves the same one).
        self.tokenizer = load_tokenizer(
            cfg.model.path, cfg.model.trust_remote_code, template_text(cfg.data.chat_template)
        )
        local = tuned_dir
        if not storage.is_local(tuned_dir):
            self._tmp = tempfile.TemporaryDirectory(prefix="sft-ray-eval-")
            local = storage.download_dir(tuned_dir, self._tmp.name, skip=RESUME_ONLY)
        # Loaded as training loaded it (4-bit for QLoRA, embeddings fitted to the tokenizer), whole on this device.
        whole = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"strategy": "ddp"})})
        base = load_model(whole, self.device, self.tokenizer)
        if os.path.exists(os.path.join(local, "adapter_config.json")):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(base, local).eval()
            self.base = None
        else:  # lora: null, final/ is a whole model
            self.base = base.eval()
            self.model = AutoModelForCausalLM.from_pretrained(local, dtype=base.dtype).to(self.device).eval()
        self.stops = sorted({t for f in formats.values() for t in stop_ids(cfg, self.tokenizer, set(f))})
        self.next_turn = {s: next_turn_markers(cfg, self.tokenizer, set(f)) for s, f in formats.items()}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

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
        references = [r["reference_ids"] for r in rows]
        out = {
            "set": [r["set"] for r in rows],
            "index": [r["index"] for r in rows],
            "prompt": [self.tokenizer.decode(p) for p in prompts],
            "reference": [self.tokenizer.decode(r) for r in references],
            "reference_tokens": [len(r) for r in references],
            "replica": [self.name] * len(rows),
        }
        answer_ref = [self.tokenizer.decode(r, skip_special_tokens=True) for r in references]
        for which in MODELS:
            model, context = self._switched(which)
            with torch.no_grad(), context:
                generated = self._generate(model, prompts, rows[0]["index"])
                losses = self._losses(model, prompts, references)
            out[f"{which}_output"] = [self.tokenizer.decode(g) for g in generated]
            out[f"{which}_output_tokens"] = [len(g) for g in generated]
            out[f"{which}_loss"] = losses
            for i, g in enumerate(generated):
                stopped = bool(g) and g[-1] in self.stops
                clean = stopped and not any(m in out[f"{which}_output"][i] for m in self.next_turn[rows[i]["set"]])
                answer = self.tokenizer.decode(g, skip_special_tokens=True)
                for key, value in example(answer, answer_ref[i], clean).items():
                    out.setdefault(f"{which}_{key}", []).append(value)
        return pa.table(out)

    def _generate(self, model, prompts: list[list[int]], first_index: int) -> list[list[int]]:
        """Left-padded batch generation; each answer cut after its first stop token (pads follow it)."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampled = self.e.temperature > 0
        if sampled:  # the same answers for the same prompts, whichever replica gets them
            torch.manual_seed(self.e.seed + first_index)
        config = GenerationConfig(
            max_new_tokens=self.e.max_new_tokens,
            do_sample=sampled,
            temperature=self.e.temperature if sampled else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=self.stops,
        )
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
        cut = []
        for tokens in new:
            end = next((i + 1 for i, t in enumerate(tokens) if t in self.stops), len(tokens))
            cut.append(tokens[:end])
        return cut

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
