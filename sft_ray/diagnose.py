"""Read a run's loss curves for the warning signs a fine-tuning course teaches: overfitting, no
learning, memorization. Pure functions on the summary's `history`:
`{"train": [{"step", "loss"}], "eval": [{"step", "eval_loss"}]}` (eval step 0: before training).

Each finding is a dict: `sign` (a short name), `summary` (one line with the numbers), `numbers`
(what triggered it) and `try` (what to change). A sign that the curves are too short to judge
is not silently passed: one `too few points` note says which signs were not checked and why.
"""

from __future__ import annotations

# Overfitting needs a trend: the best evaluation and at least two after it, each higher than the one before.
MIN_EVALS_OVERFIT = 3
# Rises smaller than this (relative to the best eval loss) are evaluation noise, not overfitting.
OVERFIT_RISE = 0.02
# No learning: the best eval loss after training started is less than 2% below the first evaluation.
NO_LEARNING_DROP = 0.02
# Train loss this close to zero means the training answers are reproduced almost token for token.
MEMORIZED_TRAIN_LOSS = 0.05
# ...and eval loss this far above it (in nats) means that recall did not carry over to held-out rows.
MEMORIZED_EVAL_GAP = 0.3
# The last few train losses are averaged: one logged step is noisy (a batch of easy rows).
TRAIN_TAIL = 3


def _evals(history: dict) -> list[tuple[int, float]]:
    return sorted(
        (e["step"], float(e["eval_loss"])) for e in history.get("eval") or [] if e.get("eval_loss") is not None
    )


def _train(history: dict) -> list[tuple[int, float]]:
    return sorted((e["step"], float(e["loss"])) for e in history.get("train") or [] if e.get("loss") is not None)


def _train_near(train: list[tuple[int, float]], step: int) -> float:
    """Mean of the last TRAIN_TAIL train losses logged at or before `step` (the first ones when none is)."""
    upto = [v for s, v in train if s <= step] or [v for _, v in train[:1]]
    tail = upto[-TRAIN_TAIL:]
    return sum(tail) / len(tail)


def _overfitting(evals, train) -> dict | None:
    best_i = min(range(len(evals)), key=lambda i: evals[i][1])
    after = evals[best_i:]
    if len(after) < 3 or any(b[1] <= a[1] for a, b in zip(after[-3:], after[-2:])):
        return None  # not rising over the last evaluations
    (best_step, best), (last_step, last) = evals[best_i], evals[-1]
    rise = (last - best) / best if best > 0 else float("inf")
    if rise < OVERFIT_RISE or not train:
        return None
    train_then, train_now = _train_near(train, best_step), _train_near(train, last_step)
    if train_now >= train_then:
        return None  # both rise: unstable training, not overfitting
    return {
        "sign": "overfitting",
        "summary": (
            f"eval loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step}, +{rise:.0%}) "
            f"while train loss fell from {train_then:.3f} to {train_now:.3f}"
        ),
        "numbers": {
            "best_eval_step": best_step,
            "best_eval_loss": best,
            "last_eval_step": last_step,
            "last_eval_loss": last,
            "eval_rise": rise,
            "train_loss_at_best": train_then,
            "train_loss_last": train_now,
        },
        "try": [
            f"fewer epochs, or stop near step {best_step} "
            "(early stopping: train.early_stopping; for this run: `sft-ray export RUN --checkpoint best`)",
            "more training data",
            "a lower learning rate (train.learning_rate)",
            "more dropout (lora.dropout) or weight decay (train.weight_decay)",
        ],
    }


def _no_learning(evals) -> dict | None:
    (first_step, first), later = evals[0], evals[1:]
    best_step, best = min(later, key=lambda e: e[1])
    drop = (first - best) / first if first > 0 else 0.0
    if drop >= NO_LEARNING_DROP:
        return None
    return {
        "sign": "no learning",
        "summary": (
            f"eval loss {first:.3f} at step {first_step}, best {best:.3f} after (step {best_step}): "
            f"{drop:.1%} lower, under the {NO_LEARNING_DROP:.0%} that counts as learning"
        ),
        "numbers": {"first_eval_step": first_step, "first_eval_loss": first, "best_eval_loss": best, "drop": drop},
        "try": [
            "a higher learning rate (train.learning_rate)",
            "check what is trained: `sft-ray audit --config FILE` highlights the trained tokens (masking)",
            "more steps (train.epochs or train.max_steps)",
        ],
    }


def _memorization(evals, train) -> dict | None:
    train_now = _train_near(train, train[-1][0])
    last_step, last = evals[-1]
    if train_now >= MEMORIZED_TRAIN_LOSS or last - train_now < MEMORIZED_EVAL_GAP:
        return None
    return {
        "sign": "memorization",
        "summary": (
            f"train loss {train_now:.3f} (near zero) while eval loss is {last:.3f} (step {last_step}): "
            "the training rows are recalled, the task is not learned"
        ),
        "numbers": {"train_loss_last": train_now, "last_eval_step": last_step, "last_eval_loss": last},
        "try": [
            "fewer epochs, or early stopping on eval loss (train.early_stopping)",
            "more (and more varied) training data; check for duplicated rows",
            "a lower learning rate, more dropout (lora.dropout)",
        ],
    }


def diagnose(history: dict | None) -> list[dict]:
    """Findings on the loss curves, the strongest sign first; [] when they look healthy."""
    history = history or {}
    evals, train = _evals(history), _train(history)
    findings, unchecked = [], []
    if len(evals) >= MIN_EVALS_OVERFIT:
        findings.append(_overfitting(evals, train))
    else:
        unchecked.append(f"overfitting needs {MIN_EVALS_OVERFIT} evaluations")
    if len(evals) >= 2:
        findings.append(_no_learning(evals))
    else:
        unchecked.append("no learning needs 2 evaluations")
    if evals and len(train) >= TRAIN_TAIL:
        findings.append(_memorization(evals, train))
    else:
        unchecked.append(f"memorization needs an evaluation and {TRAIN_TAIL} train losses")
    findings = [f for f in findings if f]
    if unchecked:
        findings.append(
            {
                "sign": "too few points",
                "summary": (
                    f"{len(evals)} evaluation(s) and {len(train)} logged train loss(es) are too few to judge: "
                    + "; ".join(unchecked)
                ),
                "numbers": {"evaluations": len(evals), "train_logs": len(train)},
                "try": ["evaluate more often (a smaller train.eval_steps) and log more often (train.logging_steps)"],
            }
        )
    return findings


def format_findings(findings: list[dict]) -> list[str]:
    """Lines for a terminal: `overfitting: <numbers>` then `  try: ...`."""
    lines = []
    for f in findings:
        lines.append(f"{f['sign']}: {f['summary']}")
        lines.append(f"  try: {'; '.join(f['try'])}")
    return lines
