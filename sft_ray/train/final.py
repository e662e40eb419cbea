"""The run's `final/` folder: adapter, tokenizer, resolved config, metrics and sample generations."""

from __future__ import annotations

import tempfile

import yaml

from sft_ray import storage
from sft_ray.config import Config


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.storage.path, cfg.name)


def stored_summary(cfg: Config) -> dict | None:
    """The summary of this run's complete final/, as the driver prints it; None when there is none."""
    dest = storage.join(run_dir(cfg), "final")
    if not storage.exists(storage.join(dest, storage.COMPLETE)):
        return None
    samples = storage.read_json(storage.join(dest, "samples.json"))["samples"]
    return {**storage.read_json(storage.join(dest, "metrics.json")), "final_dir": dest, "samples": samples}


def stored_config(cfg: Config) -> dict:
    """The resolved config that this run's final/ was trained with."""
    fs, path = storage.filesystem(storage.join(run_dir(cfg), "final", "config.yaml"))
    with fs.open_input_stream(path) as f:
        return yaml.safe_load(f.read().decode())


def _loss_history(log_history: list[dict], eval_before: float | None) -> dict:
    train = [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e]
    evals = {0: eval_before} if eval_before is not None else {}
    evals.update({e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e})  # one per step
    return {"train": train, "eval": [{"step": s, "eval_loss": v} for s, v in sorted(evals.items())]}


def summarize(trainer, before: dict, after: dict, train_metrics: dict, rates: list[float], start_step: int = 0) -> dict:
    """`tokens_seen` counts the whole run; `tokens_per_second` only this attempt's tokens (since
    `start_step`, as of the last log at or before it) over this attempt's training time."""
    logs = trainer.state.log_history
    history = _loss_history(logs, before.get("eval_loss"))
    tokens = max([e.get("num_tokens", 0) for e in logs] or [0])
    earlier = max([e.get("num_tokens", 0) for e in logs if e.get("step", 0) <= start_step] or [0])
    runtime = train_metrics.get("train_runtime") or 0.0
    trained_now = trainer.state.global_step > start_step
    return {
        "global_step": trainer.state.global_step,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "train_loss_first": history["train"][0]["loss"] if history["train"] else None,
        "train_loss_last": history["train"][-1]["loss"] if history["train"] else None,
        "train_runtime_s": runtime,
        "tokens_seen": tokens,
        "tokens_per_second": (tokens - earlier) / runtime if runtime and trained_now else None,
        "trained_tokens_per_second": sum(rates) / len(rates) if rates else None,
        "history": history,
    }


def clean_stop(generation: dict, next_prompt_marker: str = "### Question") -> bool:
    """Ended with EOS on its own, without running on into a new prompt first."""
    return generation["stopped"] and next_prompt_marker not in generation["text"]


def _share(generations: list[dict]) -> float | None:
    return sum(map(clean_stop, generations)) / len(generations) if generations else None


def _exact_share(samples: list[dict], when: str) -> float | None:
    """Generations that are the reference exactly, EOS included: the plain signal for short answers."""
    return sum(s[when] == s["reference"] for s in samples) / len(samples) if samples else None


def write_final(
    cfg: Config,
    trainer,
    tokenizer,
    prompts: list[dict],
    before: dict,
    after: dict,
    train_metrics: dict,
    manifest: dict,
    rates: list[float],
    start_step: int = 0,
) -> dict:
    """Write `final/` whole (never half) and return the summary the driver prints."""
    summary = summarize(trainer, before, after, train_metrics, rates, start_step)
    samples = [
        {
            "prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True),
            "reference": tokenizer.decode(p["reference_ids"], skip_special_tokens=False),
            "before": b["text"],
            "after": a["text"],
        }
        for p, b, a in zip(prompts, before.get("generations", []), after.get("generations", []))
    ]
    shares = {
        "eos_share_before": _share(before.get("generations", [])),
        "eos_share_after": _share(after.get("generations", [])),
        "exact_share_before": _exact_share(samples, "before"),
        "exact_share_after": _exact_share(samples, "after"),
    }
    summary.update(shares)
    dest = storage.join(run_dir(cfg), "final")
    with tempfile.TemporaryDirectory() as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/config.yaml", "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        storage.write_json(f"{tmp}/metrics.json", summary)
        storage.write_json(f"{tmp}/samples.json", {"samples": samples, **shares})
        storage.write_json(f"{tmp}/data_manifest.json", manifest)
        storage.publish_dir(tmp, dest)
    return {**summary, "final_dir": dest, "samples": samples}
