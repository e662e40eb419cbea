"""Reading sources without Ray: the seeded eval carve."""

from conftest import write_jsonl

from sft_ray.data.sources import plan_chunks, read_chunk


def _splits(path):
    rows = [r for c in plan_chunks(str(path), 0, "train", chunk_bytes=64) for r in read_chunk(c, 0.3, seed=7)]
    assert len({(r["raw"], r["split"]) for r in rows}) == len({r["raw"] for r in rows})  # one split per text
    return {r["raw"]: r["split"] for r in rows}, [r["split"] for r in rows]


def test_eval_carve_is_seeded_by_content_not_location(tmp_path):
    rows = [{"question": f"Q{i}", "output": f"A{i}"} for i in range(200)]
    a, order_a = _splits(write_jsonl(tmp_path / "a" / "train.jsonl", rows + rows[:20]))
    b, _ = _splits(write_jsonl(tmp_path / "elsewhere" / "renamed.jsonl", rows[::-1]))
    assert 30 <= order_a.count("eval") <= 100
    assert a == b  # the same rows go to eval wherever the file lives and in whatever order
    assert len(order_a) == 220 and len(a) == 200  # 20 duplicates, each in the split of its original
    _, other_seed = zip(
        *sorted(
            (r["raw"], r["split"])
            for c in plan_chunks(str(tmp_path / "a" / "train.jsonl"), 0, "train")
            for r in read_chunk(c, 0.3, seed=8)
        )
    )
    assert list(other_seed) != [a[k] for k in sorted(a)]
