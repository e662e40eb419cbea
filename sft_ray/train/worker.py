"""What every Ray Train worker runs: TRL's SFTTrainer with a LoRA (or QLoRA) adapter on prepared rows.

Heavy imports (torch, transformers, trl, peft) happen here, inside the worker process.
Each worker reads its own share of the prepared rows from storage (train/shards.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.train import tracking


def sample_prompts(eval_ds, n: int) -> list[dict]:
    """The first n held-out rows split into prompt ids (the untrained prefix) and reference ids
    (the first trained span: a multi-turn conversation's first assistant turn, not the later ones)."""
    from sft_ray.evaluation.examples import spans

    out = []
    for row in eval_ds.select(range(min(n, len(eval_ds)))):
        first, end = spans(row["labels"])[0]
        out.append({"prompt_ids": row["input_ids"][:first], "reference_ids": row["labels"][first:end]})
    return out


def generate(model, tokenizer, prompts: list[dict], device, stops: list[int], synced: bool = False) -> list[dict]:
    """Greedy continuations; `stopped` is whether the model produced a stop token (EOS, or the
    chat template's end of turn where that differs) itself. `synced`: every worker calls this with
    the same prompts, as a sharded model needs (each step gathers layers from all of them); a worker
    that has stopped keeps stepping until all have."""
    import torch

    from sft_ray.model import plain_generation

    results = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["prompt_ids"]], device=device)
            config = plain_generation(len(p["reference_ids"]) + 16, 0.0, tokenizer.pad_token_id, stops)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, synced_gpus=synced
            )
            new = out[0, ids.shape[1] :].tolist()
            results.append(
                {
                    "text": tokenizer.decode(new),
                    "answer": tokenizer.decode(new, skip_special_tokens=True),
                    "stopped": any(t in new for t in stops),
                }
            )
    model.train(was_training)
    return results


def _sft_config(cfg: Config, output_dir: str, device, has_eval: bool, resumed: bool):
    from trl import SFTConfig

    from sft_ray.train import fsdp

    t = cfg.train
    sharding = {"fsdp": True, "fsdp_config": fsdp.fsdp_config(cfg)} if fsdp.enabled(cfg) else {}
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
        # Under fsdp it is FSDP's own (fsdp_config).
        activation_checkpointing=t.gradient_checkpointing and not sharding,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=list(t.report_to) or "none",
        run_name=cfg.name,  # the W&B / MLflow run (train/tracking.py opens them under this name first)
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized and masked already
        remove_unused_columns=False,
        **sharding,
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


def _baseline_generations(me: Worker, built: Built, resumed: bool) -> dict:
    """Generations before training, by rank 0 (its model is whole until the trainer shards it:
    under fsdp the other workers' are empty), kept in storage so a resumed run still has them."""
    uri = storage.join(me.run_dir, "baseline.json")
    if resumed and storage.exists(uri):
        return storage.read_json(uri)
    if me.rank != 0:
        return {}
    model, prompts = built.trainer.model, built.prompts
    device = next(model.parameters()).device  # under fsdp: where the whole model waits to be sharded
    before = {"generations": generate(model, built.tokenizer, prompts, device, built.stops) if prompts else []}
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


@dataclasses.dataclass
class Worker:
    """What one worker knows about its place in the run."""

    cfg: Config
    rank: int
    world: int
    device: object
    run_dir: str
    output_dir: str


@dataclasses.dataclass
class Built:
    """The trainer and what the steps after training need from its making."""

    trainer: object
    tokenizer: object
    callback: object
    prompts: list[dict]
    stops: list[int]
    share: dict


def train_loop(loop_config: dict) -> dict:
    """The recipe every worker runs: build the trainer, train (or resume), finish (rank 0 writes final/)."""
    import ray.train

    from sft_ray.console import quiet_worker
    from sft_ray.train import early_stop

    quiet_worker(loop_config.get("verbose", False))
    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    run_dir = storage.join(cfg.storage.path, cfg.name)
    me = Worker(
        cfg,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),
        run_dir,
        _local_dir(cfg.name, run_dir),
    )
    resume_dir = ray.train.get_checkpoint()
    with tracking.closed_on_failure(cfg, me.rank):  # an error ends the tracker runs as failed
        built = build_trainer(me, loop_config, resumed=resume_dir is not None)
        before = _baseline_generations(me, built, resumed=resume_dir is not None)
        result, start_step = train_or_resume(built.trainer, resume_dir)
        if built.callback.interrupted:  # saved at this step and handed to Ray Train; final/ waits for the rerun
            built.callback.upload_logs()
            ray.train.report({"interrupted": 1, "step": built.trainer.state.global_step})
            tracking.close(cfg, me.rank)  # the MLflow run ends as KILLED
            _clean_scratch(me.output_dir)
            return {"interrupted": True, "global_step": built.trainer.state.global_step}
        stopped = early_stop.keep_best(cfg, built.trainer, run_dir, me.output_dir, me.rank, me.world)
        summary = finish(me, built, loop_config["manifest"], before, result, start_step, stopped)
    tracking.close(cfg, me.rank, summary.get("final_dir"))  # final/ to MLflow; the runs end
    _clean_scratch(me.output_dir)
    return summary


def build_trainer(me: Worker, loop_config: dict, resumed: bool) -> Built:
    """Tokenizer, model, this worker's rows and TRL's SFTTrainer with the run's callbacks."""
    from transformers import PrinterCallback

    from sft_ray.chat_format import template_text
    from sft_ray.model import (
        check_packing_isolates,
        load_model,
        load_tokenizer,
        lora_config,
        serve_trained_rows_to_trl,
        token_rows,
    )
    from sft_ray.train import fsdp
    from sft_ray.train.callbacks import RunCallback, TokenCounter, count_packed_rows_in_num_tokens
    from sft_ray.train.collate import make_collator
    from sft_ray.train.compat import attn_implementation
    from sft_ray.train.early_stop import EarlyStopping
    from sft_ray.train.exact_match import ExactMatch
    from sft_ray.train.final import stop_ids
    from sft_ray.train.shards import even_out, keep_own_share, load_share, rows_per_worker

    cfg = me.cfg
    tracking.start(cfg, loop_config, me.rank, me.run_dir, resumed)  # rank 0 opens the W&B / MLflow runs
    tb_dir = os.path.join(me.output_dir, "tensorboard") if "tensorboard" in cfg.train.report_to else None
    if tb_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir
    template = template_text(cfg.data.chat_template)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template)
    fsdp.announce_loading(cfg)
    model = load_model(cfg, me.device, tokenizer)
    if cfg.data.packing and fsdp.holds_weights(cfg):
        check_packing_isolates(model, cfg.model.path)
    prepared, manifest = loop_config["prepared"], loop_config["manifest"]
    scratch = os.path.join(me.output_dir, "data")
    own = load_share(prepared, manifest, "train", me.rank, me.world, scratch)
    rows = rows_per_worker(manifest, me.world, cfg.train.per_device_batch_size)
    train_ds = even_out(own, rows, tokenizer.pad_token_id)
    eval_ds = load_share(prepared, manifest, "eval", me.rank, me.world, scratch)
    # What this worker holds (rank 0 writes every worker's into the summary): tests and users can
    # check that no worker holds another's rows, and that they are memory-mapped, not in memory.
    share = {
        "rank": me.rank,
        "rows": len(own),
        "filler": len(train_ds) - len(own),
        "memory_mapped": bool(own.cache_files),
    }
    counter = TokenCounter()
    callback = RunCallback(
        counter,
        me.run_dir,
        me.rank,
        me.device,
        tb_dir,
        loop_config.get("fail", {}),
        loop_config.get("async_upload", True),
        sharded_checkpoints=fsdp.enabled(cfg),
    )
    trainer = fsdp.trainer_class(cfg, me.device)(
        model=model,
        args=_sft_config(cfg, me.output_dir, me.device, eval_ds is not None, resumed),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, token_rows(model, tokenizer, template) if cfg.lora else None),
        # Flatten packed rows only for a varlen kernel (see collate.py).
        data_collator=make_collator(tokenizer.pad_token_id, "flash" in attn_implementation(model)),
    )
    serve_trained_rows_to_trl(trainer.model)
    keep_own_share(trainer, me.world)
    trainer.training_step = counter.wrap(trainer.training_step)
    count_packed_rows_in_num_tokens(trainer)
    # First in line, so the throughput it adds to each log reaches TensorBoard and MLflow too.
    trainer.callback_handler.callbacks.insert(0, callback)
    if not loop_config.get("verbose", False):  # the driver prints progress (sft_ray/progress.py)
        trainer.remove_callback(PrinterCallback)
    if cfg.train.early_stopping is not None:
        trainer.add_callback(EarlyStopping(cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta))
    stops = stop_ids(cfg, tokenizer)
    if cfg.eval.exact_match_rows and eval_ds is not None:
        held_out = sample_prompts(eval_ds, cfg.eval.exact_match_rows)
        exact = ExactMatch(trainer, tokenizer, held_out, stops, me.rank, me.device)
        trainer.callback_handler.callbacks.insert(0, exact)  # logged before RunCallback reports the evaluation
    prompts = sample_prompts(eval_ds, cfg.train.samples) if eval_ds is not None else []
    return Built(trainer, tokenizer, callback, prompts, stops, share)


def train_or_resume(trainer, checkpoint) -> tuple[object, int]:
    """Train from the start, or from Ray Train's latest checkpoint (the HF checkpoint folder it
    holds restores weights, optimizer, scheduler, RNG states and the data position).
    Returns the train result and the step this attempt started from."""
    if checkpoint is None:
        return trainer.train(), 0
    with checkpoint.as_directory() as ckpt_dir:
        with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
            start_step = json.load(f)["global_step"]
        return trainer.train(resume_from_checkpoint=ckpt_dir), start_step


def finish(
    me: Worker, built: Built, manifest: dict, before: dict, result, start_step: int, stopped: dict | None
) -> dict:
    """The final evaluation and generations, final/ written whole by rank 0, the last report.
    `stopped`: what early stopping did (train/early_stop.py), kept in the summary."""
    import ray.train

    from sft_ray.train import fsdp
    from sft_ray.train.callbacks import peak_memory_mb
    from sft_ray.train.exact_match import KEY as EXACT
    from sft_ray.train.final import write_final

    trainer, cfg = built.trainer, me.cfg
    synced = fsdp.sharded(trainer.model)  # sharded: every worker generates and gathers, in step
    kept = _kept_final(cfg, trainer.state.global_step, start_step, me.rank)
    if kept is not None:
        after = {"eval_loss": kept["eval_loss_after"]} if kept.get("eval_loss_after") is not None else {}
    else:
        after = {"eval_loss": trainer.evaluate()["eval_loss"]} if trainer.eval_dataset is not None else {}
    shares = _gathered({**built.share, "sharded": synced, "peak_memory_mb": peak_memory_mb(me.device)})
    summary = kept if kept is not None and me.rank == 0 else {}
    if kept is None:
        if (me.rank == 0 or synced) and built.prompts:
            after["generations"] = generate(
                trainer.model, built.tokenizer, built.prompts, me.device, built.stops, synced
            )
        weights = fsdp.trainable_state_dict(trainer)
        if me.rank == 0:
            before = storage.read_json(storage.join(me.run_dir, "baseline.json"))  # + the step-0 eval loss
            after.setdefault("generations", [])
            summary = write_final(
                cfg,
                trainer,
                built.tokenizer,
                built.prompts,
                before,
                after,
                result.metrics,
                manifest,
                built.callback.rates,
                start_step,
                shares,
                weights,
                stopped,
            )
            built.callback.upload_logs()
    final_metrics = {"finished": 1, "step": trainer.state.global_step}
    if "eval_loss" in after:
        final_metrics["eval_loss"] = after["eval_loss"]
    measured = [e[EXACT] for e in trainer.state.log_history if EXACT in e]
    if measured:  # the last evaluation's: a sweep ranking by it finds it in every trial's last result
        final_metrics[EXACT] = measured[-1]
    ray.train.report(final_metrics)
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
