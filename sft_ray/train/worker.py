"""What every Ray Train worker runs: TRL's SFTTrainer with a LoRA (or QLoRA) adapter on prepared rows.

Heavy imports (torch, transformers, trl, peft) happen here, inside the worker process.
Each worker reads its own share of the prepared rows from storage (train/shards.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.data.tokenize import IGNORE


def sample_prompts(eval_ds, n: int) -> list[dict]:
    """The first n held-out rows split into prompt ids (the untrained prefix) and reference ids
    (the first trained span: a multi-turn conversation's first assistant turn, not the later ones)."""
    out = []
    for row in eval_ds.select(range(min(n, len(eval_ds)))):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
        out.append({"prompt_ids": ids[:first], "reference_ids": labels[first:end]})
    return out


def generate(model, tokenizer, prompts: list[dict], device, stops: list[int]) -> list[dict]:
    """Greedy continuations; `stopped` is whether the model produced a stop token (EOS, or the
    chat template's end of turn where that differs) itself."""
    import torch

    results = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["prompt_ids"]], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(p["reference_ids"]) + 16,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
            new = out[0, ids.shape[1] :].tolist()
            results.append({"text": tokenizer.decode(new), "stopped": any(t in new for t in stops)})
    model.train(was_training)
    return results


def _sft_config(cfg: Config, output_dir: str, device, has_eval: bool, resumed: bool):
    from trl import SFTConfig

    t = cfg.train
    on_gpu = device.type == "cuda"
    bf16 = on_gpu and (
        cfg.model.dtype == "bfloat16" or (cfg.quantization is not None and cfg.quantization.compute_dtype == "bfloat16")
    )
    return SFTConfig(
        output_dir=output_dir,
        use_cpu=not on_gpu,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        # The "before" eval loss, measured inside train(): calling trainer.evaluate() before train()
        # under DDP changes the training that follows (measured: different losses from step 2).
        eval_on_start=has_eval and not resumed,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # local copies only; the kept checkpoints live in storage
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        # TRL would default it on (stack-notes T2); the new names also keep the old ones' FutureWarning away.
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized and masked already
        remove_unused_columns=False,
    )


def _local_dir(name: str, run_dir: str) -> str:
    """One fresh folder per attempt, the same on every rank of a node (rank 0 picks, all agree).

    The folders that earlier attempts of this run left on this node go first: an attempt that was
    killed never reached its own clean-up, and its HF checkpoints (with optimizer state) would
    otherwise pile up with every restart. Their workers are gone: Ray Train stops a worker group
    before it starts the next, and the run's lease (sft_ray/lease.py) lets one driver run it. The
    run's storage path is part of the name: a run of the same name in other storage is another run.
    """
    import hashlib
    import re
    import uuid

    import torch.distributed as dist

    box = [uuid.uuid4().hex[:8]]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    run = hashlib.sha256(run_dir.encode()).hexdigest()[:6]
    path = os.path.join(tempfile.gettempdir(), "sft-ray", f"{name}-{run}-{box[0]}")
    earlier = re.compile(re.escape(f"{os.path.basename(name)}-{run}-") + "[0-9a-f]{8}")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(os.path.dirname(path)):
            if entry.path != path and earlier.fullmatch(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)  # every rank of the node tries: fine
    return path


def _baseline_generations(
    cfg: Config, trainer, tokenizer, prompts, stops: list[int], device, rank: int, resumed: bool
) -> dict:
    """Generations before training (rank 0), kept in storage so a resumed run still has them."""
    uri = storage.join(cfg.storage.path, cfg.name, "baseline.json")
    if resumed and storage.exists(uri):
        return storage.read_json(uri)
    if rank != 0:
        return {}
    before = {"generations": generate(trainer.model, tokenizer, prompts, device, stops) if prompts else []}
    storage.write_json(uri, before)
    return before


def _gathered(item: dict) -> list[dict]:
    """Every rank's `item`, in rank order, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [item]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def _kept_final(cfg: Config, step: int, start_step: int, rank: int) -> dict | None:
    """The stored final/ summary when this attempt trained no step and final/ is of this very step.

    Such a resume (its config changed, but not its length) keeps final/: a new one would hold a
    zero-step throughput. Rank 0 decides for all, since every rank must agree on the evaluation
    that follows otherwise.
    """
    import torch.distributed as dist

    from sft_ray.train.final import stored_summary

    box = [None]
    if rank == 0 and step == start_step:
        stored = stored_summary(cfg)
        box = [stored if stored is not None and stored["global_step"] == step else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop(loop_config: dict) -> dict:
    import ray.train
    from trl import SFTTrainer

    from sft_ray.chat_format import template_text
    from sft_ray.model import (
        check_packing_isolates,
        load_model,
        load_tokenizer,
        lora_config,
        serve_trained_rows_to_trl,
        token_rows,
    )
    from sft_ray.train.callbacks import RunCallback, TokenCounter, count_packed_rows_in_num_tokens
    from sft_ray.train.collate import make_collator
    from sft_ray.train.final import stop_ids, write_final
    from sft_ray.train.shards import even_out, keep_own_share, load_share, rows_per_worker

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_dir = storage.join(cfg.storage.path, cfg.name)
    output_dir = _local_dir(cfg.name, run_dir)
    tb_dir = os.path.join(output_dir, "tensorboard") if "tensorboard" in cfg.train.report_to else None
    if tb_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir

    template = template_text(cfg.data.chat_template)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template)
    model = load_model(cfg, device, tokenizer)
    if cfg.data.packing:
        check_packing_isolates(model, cfg.model.path)
    prepared, manifest = loop_config["prepared"], loop_config["manifest"]
    own = load_share(prepared, manifest, "train", rank, world, os.path.join(output_dir, "data"))
    train_ds = even_out(own, rows_per_worker(manifest, world, cfg.train.per_device_batch_size), tokenizer.pad_token_id)
    eval_ds = load_share(prepared, manifest, "eval", rank, world, os.path.join(output_dir, "data"))
    # What this worker holds (rank 0 writes every worker's into the summary): tests and users can
    # check that no worker holds another's rows, and that they are memory-mapped, not in memory.
    share = {"rank": rank, "rows": len(own), "filler": len(train_ds) - len(own), "memory_mapped": bool(own.cache_files)}
    counter = TokenCounter()
    checkpoint = ray.train.get_checkpoint()
    callback = RunCallback(
        counter, run_dir, rank, device, tb_dir, loop_config.get("fail", {}), loop_config.get("async_upload", True)
    )
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(cfg, output_dir, device, eval_ds is not None, checkpoint is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, token_rows(model, tokenizer, template)),
        # Flatten packed rows only for a varlen kernel (see collate.py).
        data_collator=make_collator(tokenizer.pad_token_id, "flash" in (model.config._attn_implementation or "")),
    )
    serve_trained_rows_to_trl(trainer.model)
    keep_own_share(trainer, world)
    trainer.training_step = counter.wrap(trainer.training_step)
    count_packed_rows_in_num_tokens(trainer)
    # First in line, so the throughput it adds to each log reaches TensorBoard and MLflow too.
    trainer.callback_handler.callbacks.insert(0, callback)

    prompts = sample_prompts(eval_ds, cfg.train.samples) if eval_ds is not None else []
    stops = stop_ids(cfg, tokenizer)
    before = _baseline_generations(cfg, trainer, tokenizer, prompts, stops, device, rank, checkpoint is not None)
    start_step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
                start_step = json.load(f)["global_step"]
            result = trainer.train(resume_from_checkpoint=ckpt_dir)
    else:
        result = trainer.train()
    if callback.interrupted:  # saved at this step and handed to Ray Train; final/ waits for the rerun
        callback.upload_logs()
        ray.train.report({"interrupted": 1, "step": trainer.state.global_step})
        _clean_scratch(output_dir)
        return {"interrupted": True, "global_step": trainer.state.global_step}
    kept = _kept_final(cfg, trainer.state.global_step, start_step, rank)
    if kept is not None:
        after = {"eval_loss": kept["eval_loss_after"]} if kept.get("eval_loss_after") is not None else {}
    else:
        after = {"eval_loss": trainer.evaluate()["eval_loss"]} if eval_ds is not None else {}

    shares = _gathered(share)
    summary = kept if kept is not None and rank == 0 else {}
    if kept is None and rank == 0:
        before = storage.read_json(storage.join(run_dir, "baseline.json"))  # + the step-0 eval loss
        after["generations"] = generate(trainer.model, tokenizer, prompts, device, stops) if prompts else []
        summary = write_final(
            cfg,
            trainer,
            tokenizer,
            prompts,
            before,
            after,
            result.metrics,
            loop_config["manifest"],
            callback.rates,
            start_step,
            shares,
        )
        callback.upload_logs()
    final_metrics = {"finished": 1, "step": trainer.state.global_step}
    if "eval_loss" in after:
        final_metrics["eval_loss"] = after["eval_loss"]
    ray.train.report(final_metrics)
    _clean_scratch(output_dir)
    return summary


def _clean_scratch(output_dir: str) -> None:
    """Local scratch goes (what is kept is in storage), except the staged uploads (`upload-*`) that
    Ray may still be copying in the background and deletes itself once done."""
    for entry in os.scandir(output_dir):
        if entry.name.startswith("upload-"):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # ranks of one node share the folder: both clean
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
