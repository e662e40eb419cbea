"""Generation throughput of `sft-ray eval`: the Ray Data pool of model replicas against a plain `model.generate` loop.

    python benchmarks/eval_bench.py [--repeat N | --quick] [--max-new-tokens N] [--replicas N]

The demo run (`--config jobs/configs/demo.yaml`, adapter `runs/demo/final`: `make demo` makes it), its
held-out file `jobs/data/demo/eval.jsonl` (60 instruction rows) repeated `--repeat` times into a
temporary JSONL; timed in one run on this machine, on the same examples:

- pool: `sft_ray.evaluation.run.evaluate(cfg, data=...)`, base and tuned answers in left-padded
  batches of `eval.batch_size` on an ActorPoolStrategy pool of `eval.replicas` actors (1 CPU each).
  Its wall time (preparation, actor start-up, model loads, generation, writing; Ray's start apart)
  and the pool's own `summary["seconds"]` (from the first batch asked for to the last one written:
  actor start-up and model loads included, preparation not). Each batch the pool also computes the
  teacher-forced reference loss for base and tuned and the per-example metrics, which the plain
  loop does not. storage.path is a temporary folder whose `demo/final` links to the real one.
- plain: after `ray.shutdown()`, in this process with torch's default threads: the base loaded as
  `load_model`/`load_tokenizer` load it, the same adapter on it (`PeftModel.from_pretrained`), then
  for every example one `model.generate` of one prompt (greedy, the same max_new_tokens and stop ids
  as the pool), with the adapter on (tuned) and off (`disable_adapter()`, base). Its answers are
  checked against the pool's.
- batched: the pool's own per-batch code in this process, without Ray: a `Replica` called on the
  same blocks; once generation only (the plain loop's work, batched) and once its whole `__call__`
  (generation + losses + metrics: the pool's work). It separates batching from Ray's parallelism.

examples/s = examples / seconds. Prints a table, the ratios and, last, one JSON line. The machine
may be shared: every phase also shows the cores this process and the whole machine kept busy.
Starts Ray: run it alone, `flock /tmp/sft-ray-ray.lock python benchmarks/eval_bench.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROWS = "jobs/data/demo/eval.jsonl"


def _busy() -> float:
    """CPU seconds the whole machine has been busy (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:8]]
    return (sum(t) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")


class Phase:
    """A block's wall seconds, and the cores this process and the whole machine kept busy meanwhile."""

    def __enter__(self):
        self.t, self.cpu, self.busy = time.perf_counter(), time.process_time(), _busy()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
        self.own, self.machine = (time.process_time() - self.cpu) / self.s, (_busy() - self.busy) / self.s


def run_pool(cfg, data: str) -> dict:
    from sft_ray.evaluation.run import evaluate
    from sft_ray.ray_runtime import ensure_ray

    with Phase() as init:
        ensure_ray()
    with Phase() as wall:
        (summary,) = evaluate(cfg, data=data)
    return {"ray_init_s": init.s, "wall": wall, "summary": summary}


def plain_loop(cfg, tuned: str, prompts: list[list[int]]) -> dict:
    import torch
    from peft import PeftModel
    from transformers import GenerationConfig

    from sft_ray.chat_format import template_text
    from sft_ray.model import load_model, load_tokenizer
    from sft_ray.train.final import stop_ids

    t0 = time.perf_counter()  # loading
    tok = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, template_text(cfg.data.chat_template))
    whole = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"strategy": "ddp"})})  # as Replica
    model = PeftModel.from_pretrained(load_model(whole, torch.device("cpu"), tok), tuned).eval()
    stops = stop_ids(cfg, tok, {"instruction"})
    gen = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                           top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=stops)  # fmt: skip
    load_s = time.perf_counter() - t0
    out = {"base": [], "tuned": []}
    with Phase() as loop, torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for which in ("tuned", "base"):
                with model.disable_adapter() if which == "base" else contextlib.nullcontext():
                    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
                tokens = new[0, len(p) :].tolist()
                end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
                out[which].append(tok.decode(tokens[:end]))
    return {"load_s": load_s, "loop": loop, "outputs": out}


def batched(cfg, tuned: str, table, set_name: str) -> dict:
    import torch

    from sft_ray.evaluation.metrics import MODELS
    from sft_ray.evaluation.replica import Replica

    size = cfg.eval.batch_size
    blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)]
    t0 = time.perf_counter()
    replica = Replica(cfg.model_dump(mode="json"), tuned, {set_name: ["instruction"]})
    load_s = time.perf_counter() - t0
    with Phase() as generate:
        for block in blocks:
            prompts = block.column("prompt_ids").to_pylist()
            for which in MODELS:
                model, context = replica._switched(which)
                with torch.no_grad(), context:
                    replica._generate(model, prompts, block.column("index")[0].as_py())
    with Phase() as full:
        for block in blocks:
            replica(block)
    return {"load_s": load_s, "generate": generate, "full": full, "batches": len(blocks)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="jobs/configs/demo.yaml")
    p.add_argument("--repeat", type=int, default=4, help=f"times {ROWS} is repeated (60 rows each)")
    p.add_argument("--quick", action="store_true", help="smoke run: --repeat 1")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    os.environ.pop("RAY_ADDRESS", None)  # always an embedded local Ray, never someone's cluster

    from sft_ray.config import load_config
    from sft_ray.evaluation.run import _examples, _file_set
    from sft_ray.train.final import run_dir

    overrides = [f"eval.max_new_tokens={args.max_new_tokens}", f"eval.replicas={args.replicas}"]
    final = Path(run_dir(load_config(args.config, overrides)), "final")
    if not (final / "adapter_config.json").exists():
        print(f"{final}: no trained adapter; run `make demo` first (from the repo root)", file=sys.stderr)
        sys.exit(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        cfg = load_config(args.config, [*overrides, f"storage.path={tmp}/storage"])
        Path(run_dir(cfg)).mkdir(parents=True)
        os.symlink(final.resolve(), Path(run_dir(cfg), "final"))
        data = Path(tmp, "bench.jsonl")
        data.write_text(Path(ROWS).read_text() * repeat)
        import ray

        try:
            pool = run_pool(cfg, str(data))
            s = pool["summary"]
            # The pool's own table of examples (set, index, prompt_ids, reference_ids), its preparation reused.
            table = _examples([_file_set(cfg, str(data), "instruction", "held_out", "--data")])
            with open(Path(run_dir(cfg), "eval", s["set"], "examples.jsonl")) as f:
                rows = {r["index"]: r for r in map(json.loads, f)}
        finally:
            ray.shutdown()  # the in-process runs get the machine without Ray
        import torch

        threads = torch.get_num_threads()
        tuned = str(Path(run_dir(cfg), "final"))
        plain = plain_loop(cfg, tuned, table.column("prompt_ids").to_pylist())
        bat = batched(cfg, tuned, table, s["set"])
    n, e = table.num_rows, cfg.eval
    same = sum(rows[i][f"{m}_output"] == plain["outputs"][m][i] for i in range(n) for m in ("base", "tuned"))
    wall, loop = pool["wall"], plain["loop"]
    runs = {  # name: (label, torch threads, seconds, load seconds, Phase or None)
        "pool": (f"pool: {len(s['replicas'])} Ray Data replicas, summary['seconds']", f"{args.replicas}x1",
                 s["seconds"], None, None),
        "pool_after_start": ("pool: after its first batch (replicas loaded)", f"{args.replicas}x1",
                             s["seconds"] - s["start_seconds"], None, None),
        "pool_wall": ("pool: evaluate() wall (+preparation, writing)", f"{args.replicas}x1", wall.s, None, wall),
        "plain": ("plain: model.generate, one prompt at a time", threads, loop.s, plain["load_s"], loop),
        "batched_generate": (f"batched in-process (Replica), generate only, {bat['batches']} batches", threads,
                             bat["generate"].s, bat["load_s"], bat["generate"]),
        "batched_full": ("batched in-process (Replica), generate + losses + metrics", threads, bat["full"].s,
                         bat["load_s"], bat["full"]),
    }  # fmt: skip
    r = {k: {"seconds": v[2], "examples_per_s": n / v[2], "load_s": v[3]} for k, v in runs.items()}
    r["pool"]["examples_per_s"] = pool_eps = s["examples_per_second"]
    r["pool_after_start"]["examples_per_s"] = s["examples_per_second_after_start"]
    r["ratio_pool_plain"] = pool_eps / r["plain"]["examples_per_s"]
    r["ratio_pool_after_start_plain"] = s["examples_per_second_after_start"] / r["plain"]["examples_per_s"]
    r["ratio_pool_wall_plain_with_load"] = (loop.s + plain["load_s"]) / wall.s
    r["ratio_batched_plain"] = r["batched_generate"]["examples_per_s"] / r["plain"]["examples_per_s"]
    r["ratio_pool_batched_full"] = pool_eps / r["batched_full"]["examples_per_s"]
    r["same_outputs"], r["outputs"], r["ray_init_s"] = same, 2 * n, pool["ray_init_s"]

    print(
        f"\n{n} examples ({ROWS} x {repeat}), base and tuned each, max_new_tokens {e.max_new_tokens}, greedy, "
        f"batch_size {e.batch_size}; {os.cpu_count()} CPUs, torch threads in this process: {threads}"
    )
    print(f"{'':58}{'threads':>8}{'seconds':>9}{'examples/s':>12}{'load s':>8}{'this proc':>10}{'machine':>9}")
    for k, (label, th, sec, load, ph) in runs.items():
        load, own = "-" if load is None else f"{load:.2f}", "-" if ph is None or k == "pool_wall" else f"{ph.own:.2f}"
        line = f"{label:58}{th!s:>8}{sec:>9.2f}{r[k]['examples_per_s']:>12.2f}{load:>8}{own:>10}"
        print(line + f"{'-' if ph is None else f'{ph.machine:.2f}':>9}")
    print(
        "(the pool's figures include its actors' start-up and model loads; it also computes the reference loss "
        "for base and tuned and the per-example metrics, which the plain loop does not; plain and batched rows "
        f"exclude loading, shown apart; Ray's start, {pool['ray_init_s']:.1f}s, is in no row; this proc, machine: "
        "cores busy meanwhile in this process and on the whole machine, more than this proc means other load)"
    )
    print(f"ratio (pool / plain loop): {r['ratio_pool_plain']:.1f}x")
    print(f"ratio (pool after its first batch / plain loop): {r['ratio_pool_after_start_plain']:.1f}x")
    print(f"ratio (pool evaluate() wall / plain loop with its load): {r['ratio_pool_wall_plain_with_load']:.1f}x")
    print(
        f"batching alone (batched generate / plain loop): {r['ratio_batched_plain']:.1f}x; Ray parallelism on the "
        f"same work (pool / batched generate + losses + metrics): {r['ratio_pool_batched_full']:.2f}x"
    )
    print(f"plain loop answers identical to the pool's: {same}/{2 * n}")
    print(f"benchmark wall time {time.perf_counter() - started:.0f}s")
    print(json.dumps({"bench": "eval", "examples": n, "cpus": os.cpu_count(), "threads": threads, **_rounded(r)}))


def _rounded(v):
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


if __name__ == "__main__":
    main()
