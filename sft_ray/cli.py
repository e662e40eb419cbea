"""`sft-ray` command line: argument parsing and printing only."""

from __future__ import annotations

import argparse
import os
import sys
from typing import get_args

from sft_ray import storage
from sft_ray.config import ConfigError, Format, load_config
from sft_ray.console import quiet_driver
from sft_ray.data.pipeline import DataError
from sft_ray.lease import RunBusy
from sft_ray.storage import StorageError
from sft_ray.train.driver import Unplaceable
from sft_ray.train.interrupt import Interrupted


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--verbose", action="store_true", help="show every library's log lines too (or SFT_RAY_VERBOSE=1)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-ray", description="LoRA/QLoRA SFT on Ray Data + Ray Train")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a tiny random Llama + byte-level BPE tokenizer (offline)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="tokenize and mask the data with Ray Data")
    _config_args(p)
    p.add_argument("--output", help="write here instead of the cache under storage.path/datasets/")

    p = sub.add_parser("train", help="prepare the data, then train a LoRA adapter on Ray Train")
    _config_args(p)

    p = sub.add_parser("tune", help="a hyperparameter sweep (the config's `tune` section): one Ray Train run per trial")
    _config_args(p)

    p = sub.add_parser("eval", help="base against tuned: generate on held-out (and retention) sets with Ray Data")
    _config_args(p)
    p.add_argument("--data", help="a held-out file or folder to evaluate instead of the config's eval split")
    p.add_argument("--format", default="instruction", choices=FORMATS, help="format of --data (default: instruction)")
    p.add_argument(
        "--retention", help="a set of general ability: flagged when the tuned model does worse than the base"
    )
    p.add_argument("--retention-format", default="instruction", choices=FORMATS, help="format of --retention")
    p.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final", help="the tuned weights")

    p = sub.add_parser("audit", help="show prepared rows with trained tokens highlighted, and the data report")
    _config_args(p)
    p.add_argument("--n", type=int, default=5, help="rows to show (default: 5)")
    p.add_argument("--html", help="also write an HTML page here")

    p = sub.add_parser("plan", help="per-worker memory under ddp and fsdp, and which fits (no GPU, no Ray)")
    _config_args(p)
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="memory of one GPU (CPU workers: the memory each worker may hold), for the verdict",
    )

    p = sub.add_parser("report", help="plots and a one-page HTML summary of a run, in RUN_DIR/report/")
    p.add_argument("run_dir")

    p = sub.add_parser("export", help="print the adapter folder of a run, or merge it into a full model")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final")
    p.add_argument("--merge", metavar="OUT_DIR", help="write base + adapter merged, loadable without PEFT")
    p.add_argument("--base", help="base model path (default: the one the adapter was trained on)")
    return parser


FORMATS = list(get_args(Format))
SHOWN_SAMPLES = 3


def _varied(samples: list[dict], n: int) -> list[dict]:
    """Up to n samples, those with a reference not shown yet first: three alike show little."""
    seen, first, rest = set(), [], []
    for sample in samples:
        (rest if sample["reference"] in seen else first).append(sample)
        seen.add(sample["reference"])
    return (first + rest)[:n]


def _print_summary(s: dict) -> None:
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    print("\n=== sft-ray result ===")
    print(f"eval loss   before {f(s.get('eval_loss_before'))}  after {f(s.get('eval_loss_after'))}")
    print(f"train loss  first  {f(s.get('train_loss_first'))}  last  {f(s.get('train_loss_last'))}")
    tps, trained_tps = s.get("tokens_per_second"), s.get("trained_tokens_per_second") or 0
    rate = (
        f"= {tps:.0f} tokens/s ({trained_tps:.0f} trained tokens/s in training steps)"
        if tps is not None
        else "(no step was left to train in this attempt)"
    )
    tokens, runtime = int(s.get("tokens_seen") or 0), s.get("train_runtime_s") or 0
    print(f"steps {s.get('global_step')}, {tokens} tokens in {runtime:.1f}s {rate}")
    samples = s.get("samples", [])
    if s.get("eos_share_after") is not None:
        print(
            f"stops with EOS  before {s['eos_share_before']:.0%}  after {s['eos_share_after']:.0%}"
            f" of {len(samples)} held-out prompts"
        )
    if s.get("exact_share_after") is not None:
        print(f"exact answers   before {s['exact_share_before']:.0%}  after {s['exact_share_after']:.0%}")
    if s.get("early_stopping"):
        print(s["early_stopping"]["line"])
    if s.get("diagnosis"):
        from sft_ray.diagnose import format_findings

        print("diagnosis")
        print("\n".join(f"  {line}" for line in format_findings(s["diagnosis"])))
    final = s.get("final_dir")
    whole = final and not storage.exists(storage.join(final, "adapter_config.json"))  # lora: null
    print(f"{'model' if whole else 'adapter':<12}{final}")
    for i, sample in enumerate(_varied(samples, SHOWN_SAMPLES), 1):
        print(f"\n--- held-out prompt {i} ---\n{sample['prompt']}")
        print(f"[reference] {sample['reference']!r}")
        print(f"[before]    {sample['before']!r}")
        print(f"[after]     {sample['after']!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["SFT_RAY_VERBOSE"] = "1"
    if args.command in ("prepare", "train", "tune", "eval"):
        quiet_driver()
    try:
        if args.command == "tiny-model":
            from sft_ray.tiny_model import build_tiny_model

            print(f"tiny model written to {build_tiny_model(args.out_dir, seed=args.seed)}")
            return 0
        if args.command == "report":
            from sft_ray.report import write_report

            print(f"report written to {write_report(args.run_dir)}/index.html")
            return 0
        if args.command == "export":
            from sft_ray.export import find_checkpoint, merge

            try:
                adapter = find_checkpoint(args.run_dir, args.checkpoint)
            except ValueError as err:
                print(f"sft-ray: {err}", file=sys.stderr)
                return 1
            print(f"adapter: {adapter}")
            if args.merge:
                print(f"merged model written to {merge(str(adapter), args.merge, base_path=args.base)}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "prepare":
            from sft_ray.data.pipeline import prepare

            prepare(cfg, args.output)
        elif args.command == "audit":
            from sft_ray.data.audit import audit

            print(audit(cfg, args.n, args.html, color=sys.stdout.isatty()))
            if args.html:
                print(f"HTML audit written to {args.html}")
        elif args.command == "plan":
            from sft_ray.plan import format_plan

            print(format_plan(cfg, args.gpu_memory_gb))
        elif args.command == "train":
            from sft_ray.train.driver import train

            _print_summary(train(cfg))
        elif args.command == "eval":
            from sft_ray.evaluation.run import EvalError, evaluate, format_summary

            try:
                summaries = evaluate(
                    cfg, args.data, args.format, args.checkpoint, args.retention, args.retention_format
                )
            except EvalError as err:
                print(f"sft-ray: {err}", file=sys.stderr)
                return 1
            for s in summaries:
                print(format_summary(s))
            where = storage.join(cfg.storage.path, cfg.name, "eval")
            print(f"\nwritten to {where}/<set>/ (summary.json, examples.parquet, examples.jsonl)")
        elif args.command == "tune":
            from sft_ray.tune import SweepInterrupted, format_table, sweep

            try:
                result = sweep(cfg)
            except SweepInterrupted as err:
                print(f"sft-ray: {err}", file=sys.stderr)
                return 130
            print(f"\n=== sft-ray sweep {result['sweep']} ===\n{format_table(result['trials'])}")
            print(f"best trial  {result['best_trial'] or 'none (no trial saved a checkpoint)'}")
            print(f"adapter     {result['best_dir']}")
            print(f"results     {result['sweep_dir']}/results.csv, results.json, eval_loss.png")
    except ConfigError as err:
        print(f"sft-ray: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"sft-ray: {err}", file=sys.stderr)
        return err.status
    except (RunBusy, Unplaceable) as err:
        print(f"sft-ray: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sft-ray: interrupted before training started; nothing was trained", file=sys.stderr)
        return 130
    except (DataError, StorageError, FileNotFoundError, FileExistsError) as err:
        print(f"sft-ray: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
