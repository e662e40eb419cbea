"""`eval_exact_match` during training: at every evaluation, the share of `eval.exact_match_rows`
held-out prompts whose greedy answer is the reference exactly (special tokens and surrounding
whitespace aside, the comparison `sft-ray eval` makes: sft_ray/evaluation/metrics.py). It differs
from `sft-ray eval` in what it answers: the first trained span of each of the eval split's first
rows (as train.samples takes them), each with a budget of its reference's length + 16 tokens
rather than eval.max_new_tokens.

Eval loss can stay flat while the answers become right (the demo: eval loss near 4.1 with every
answer exact), so a sweep may rank its trials by this instead (`tune.metric: exact_match`). It is
logged next to eval_loss, so it reaches metrics.jsonl, the progress line and every report to Ray
Train and Tune (the report of an evaluation carries the latest value of every logged number).
"""

from __future__ import annotations

from transformers import TrainerCallback

KEY = "eval_exact_match"


class ExactMatch(TrainerCallback):
    """Placed before RunCallback: its value is logged before that callback reports the evaluation."""

    def __init__(self, trainer, tokenizer, prompts: list[dict], stops: list[int], rank: int, device):
        self.trainer, self.tokenizer, self.prompts, self.stops = trainer, tokenizer, prompts, stops
        self.rank, self.device = rank, device
        self.references = [tokenizer.decode(p["reference_ids"], skip_special_tokens=True) for p in prompts]
        self.training = False  # the final evaluation, after train(), is the run's summary's business

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == 0 or not self.training or not self.prompts:
            return
        self.trainer.log({KEY: self.measure()})

    def measure(self) -> float:
        """Rank 0 generates (every rank in step when the model is sharded) and tells the others."""
        import torch.distributed as dist

        from sft_ray.evaluation.metrics import example
        from sft_ray.train import fsdp
        from sft_ray.train.worker import generate

        model = self.trainer.model
        synced = fsdp.sharded(model)
        box = [None]
        if self.rank == 0 or synced:
            answers = generate(model, self.tokenizer, self.prompts, self.device, self.stops, synced)
            hits = [example(a["answer"], ref, a["stopped"])["exact_match"] for a, ref in zip(answers, self.references)]
            box = [sum(hits) / len(hits)]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return box[0]
