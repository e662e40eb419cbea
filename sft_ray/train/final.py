"""The run's `final/` folder: adapter, tokenizer, resolved config, metrics and sample generations."""

from __future__ import annotations

import tempfile

import yaml

from sft_ray import storage
from sft_ray.config import Config
from sft_ray.diagnose import diagnose


def run_dir(cfg: Config) -> str:
    return storage.join(cfg.storage.path, cfg.name)


def stored_summary(cfg: Config) -> dict | None:
    """The summary of this run's complete final/, as the driver prints it; None when there is none."""
    dest = storage.join(run_dir(cfg), "final")
    if not storage.exists(storage.join(dest, storage.COMPLETE)):
        return None
    samples = storage.read_json(storage.join(dest, "samples.json"))["samples"]
    return {**storage.read_json(storage.join(dest, "metrics.json")), "final_dir": dest, "samples": samples}


def same_training(cfg: Config) -> bool:
    """Whether this run's final/ was trained with this config. The `eval` section's generation
    settings only matter to `sft-ray eval`, not to training (its exact_match_rows does)."""

    def trained(tree: dict) -> dict:
        rows = (tree.get("eval") or {}).get("exact_match_rows", 0)
        return {**tree, "eval": {"exact_match_rows": rows}}

    return trained(stored_config(cfg)) == trained(cfg.model_dump(mode="json"))


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
        "diagnosis": diagnose(history),  # overfitting, no learning, memorization (sft_ray/diagnose.py)
    }


_PROBE_REPLY, _PROBE_NEXT = "Probe reply 7", "Probe question 9"
_PROBE_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]


def _render(tokenizer, messages: list[dict], kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def end_of_turn_id(tokenizer, kwargs: dict) -> int | None:
    """The special token the chat template closes an assistant turn with, when it is not EOS
    (Llama-3's `<|eot_id|>` before `<|end_of_text|>`): generation must stop on it too."""
    if not tokenizer.chat_template:
        return None
    text = _render(tokenizer, _PROBE_TURNS, kwargs)
    if _PROBE_REPLY not in text:
        return None
    after = tokenizer(text[text.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :], add_special_tokens=False)["input_ids"]
    special = {t for t, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    first = after[0] if after else None
    return first if first in special and first != tokenizer.eos_token_id else None


def user_turn_opener(tokenizer, kwargs: dict) -> str | None:
    """What the chat template writes to open a user turn (`<|im_start|>user`), found by rendering a
    conversation with and without a next user turn: a reply that runs into it did not stop."""
    one = _render(tokenizer, _PROBE_TURNS, kwargs)
    two = _render(tokenizer, [*_PROBE_TURNS, {"role": "user", "content": _PROBE_NEXT}], kwargs)
    end_of_reply = one[one.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    between = two[two.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) : two.index(_PROBE_NEXT)]
    opener = between.removeprefix(end_of_reply).strip()
    return opener or None


def _sample_formats(cfg: Config) -> set[str]:
    """The formats of the held-out rows (carved out of train when there is no eval data)."""
    return {src.format for src in cfg.data.eval or cfg.data.train}


def stop_ids(cfg: Config, tokenizer, formats: set[str] | None = None) -> list[int]:
    """What a sample generation stops on: EOS, and the chat template's end of turn where chat rows
    are sampled and it differs. `formats`: of the prompts (default: the held-out rows')."""
    chat = "messages" in (formats or _sample_formats(cfg))
    eot = end_of_turn_id(tokenizer, cfg.data.chat_template_kwargs) if chat else None
    return [tokenizer.eos_token_id] + ([eot] if eot is not None else [])


def next_turn_markers(cfg: Config, tokenizer, formats: set[str] | None = None) -> list[str]:
    """Where the next prompt starts in the held-out rows' formats (`### Question` for instruction,
    the template's user turn for messages; none for prompt_completion and text)."""
    from sft_ray.data.formats import NEXT_TURN

    formats = formats or _sample_formats(cfg)
    markers = {NEXT_TURN[f] for f in formats if f != "messages"} - {None}
    if "messages" in formats:
        markers.add(user_turn_opener(tokenizer, cfg.data.chat_template_kwargs))
    return sorted(m for m in markers if m)


def clean_stop(generation: dict, next_turn: list[str]) -> bool:
    """Ended with its end-of-turn token on its own, without running on into a new prompt first."""
    return generation["stopped"] and not any(m in generation["text"] for m in next_turn)


def _share(generations: list[dict], next_turn: list[str]) -> float | None:
    return sum(clean_stop(g, next_turn) for g in generations) / len(generations) if generations else None


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
    data_shares: list[dict] | None = None,
    weights: dict | None = None,
    early_stopping: dict | None = None,
) -> dict:
    """Write `final/` whole (never half) and return the summary the driver prints. `weights`: the
    trained weights gathered from a sharded model (fsdp.trainable_state_dict), None under ddp
    (the model is whole on rank 0); with an adapter PEFT keeps its own keys of them."""

    summary = summarize(trainer, before, after, train_metrics, rates, start_step)
    summary["data_shares"] = data_shares or []  # what each worker held: its own rows, filler, memory-mapped
    if early_stopping is not None:
        summary["early_stopping"] = early_stopping  # stopped_at, best_step, kept_step, line
    samples = [
        {
            "prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True),
            "reference": tokenizer.decode(p["reference_ids"], skip_special_tokens=False),
            "before": b["text"],
            "after": a["text"],
        }
        for p, b, a in zip(prompts, before.get("generations", []), after.get("generations", []))
    ]
    next_turn = next_turn_markers(cfg, tokenizer)
    shares = {
        "eos_share_before": _share(before.get("generations", []), next_turn),
        "eos_share_after": _share(after.get("generations", []), next_turn),
        "exact_share_before": _exact_share(samples, "before"),
        "exact_share_after": _exact_share(samples, "after"),
    }
    summary.update(shares)
    dest = storage.join(run_dir(cfg), "final")
    with tempfile.TemporaryDirectory() as tmp:
        trainer.model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/config.yaml", "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        storage.write_json(f"{tmp}/metrics.json", summary)
        storage.write_json(f"{tmp}/samples.json", {"samples": samples, **shares})
        storage.write_json(f"{tmp}/data_manifest.json", manifest)
        storage.publish_dir(tmp, dest)
    return {**summary, "final_dir": dest, "samples": samples}
