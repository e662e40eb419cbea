"""The loss-curve diagnosis on synthetic curves: each sign fires, none on a healthy curve."""

from sft_ray.diagnose import diagnose, format_findings


def _history(train: list[float], evals: list[float], every: int = 10, eval_every: int = 20) -> dict:
    """Train loss logged every `every` steps from step `every`; eval at step 0 and every `eval_every`."""
    return {
        "train": [{"step": every * (i + 1), "loss": v} for i, v in enumerate(train)],
        "eval": [{"step": eval_every * i, "eval_loss": v} for i, v in enumerate(evals)],
    }


def _signs(findings) -> list[str]:
    return [f["sign"] for f in findings]


HEALTHY = _history(
    train=[3.0, 2.6, 2.3, 2.1, 1.95, 1.85, 1.8, 1.75, 1.72, 1.7],
    evals=[3.2, 2.5, 2.1, 1.95, 1.9, 1.88],
)


def test_healthy_curve_has_no_finding():
    assert diagnose(HEALTHY) == []
    # A small wobble at the end (eval noise under OVERFIT_RISE) is not overfitting.
    wobble = _history([e["loss"] for e in HEALTHY["train"]], [3.2, 2.5, 2.1, 1.9, 1.905, 1.91])
    assert diagnose(wobble) == []


def test_overfitting_names_the_numbers_and_what_to_try():
    history = _history(
        train=[3.0, 2.4, 1.9, 1.5, 1.1, 0.8, 0.6, 0.45, 0.35, 0.3],
        evals=[3.2, 2.4, 2.0, 2.2, 2.5, 2.9],
    )
    (finding,) = diagnose(history)
    assert finding["sign"] == "overfitting"
    n = finding["numbers"]
    assert (n["best_eval_step"], n["best_eval_loss"], n["last_eval_step"], n["last_eval_loss"]) == (40, 2.0, 100, 2.9)
    assert round(n["eval_rise"], 2) == 0.45 and n["train_loss_last"] < n["train_loss_at_best"]
    assert "2.000 (step 40) to 2.900 (step 100, +45%)" in finding["summary"]
    advice = " ".join(finding["try"])
    for words in ("fewer epochs", "early stopping", "more training data", "lower learning rate", "dropout"):
        assert words in advice


def test_eval_and_train_both_rising_is_not_overfitting():
    history = _history(train=[3.0, 2.5, 2.0, 2.2, 2.6, 3.0, 3.3, 3.6, 3.9, 4.2], evals=[3.2, 2.4, 2.0, 2.2, 2.5, 2.9])
    assert "overfitting" not in _signs(diagnose(history))


def test_no_learning():
    history = _history(train=[3.0, 3.02, 2.98, 3.01, 2.99, 3.0], evals=[3.1, 3.09, 3.08, 3.1])
    (finding,) = diagnose(history)
    assert finding["sign"] == "no learning"
    assert finding["numbers"]["first_eval_loss"] == 3.1 and finding["numbers"]["best_eval_loss"] == 3.08
    advice = " ".join(finding["try"])
    assert "higher learning rate" in advice and "sft-ray audit" in advice and "more steps" in advice


def test_memorization():
    history = _history(
        train=[2.0, 1.0, 0.4, 0.1, 0.03, 0.01, 0.005, 0.004, 0.003, 0.002],
        evals=[2.2, 1.5, 1.2, 1.1, 1.05, 1.02],  # still falling a little: not overfitting
    )
    (finding,) = diagnose(history)
    assert finding["sign"] == "memorization"
    assert finding["numbers"]["train_loss_last"] < 0.01 and finding["numbers"]["last_eval_loss"] == 1.02
    # A task the model really learned to near-zero loss (eval near zero too) is not memorization.
    learned = _history(train=[2.0, 0.5, 0.05, 0.01, 0.005, 0.003], evals=[2.2, 0.3, 0.02, 0.01])
    assert diagnose(learned) == []


def test_too_few_points_says_so_and_claims_nothing():
    for history in (None, {}, _history(train=[3.0, 2.0], evals=[3.1]), _history(train=[], evals=[])):
        findings = diagnose(history)
        assert _signs(findings) == ["too few points"]
        assert "overfitting needs 3 evaluations" in findings[0]["summary"]
        assert "no learning needs 2 evaluations" in findings[0]["summary"]
    # Before and after only (2 evaluations): no learning is judged, overfitting is not.
    findings = diagnose(_history(train=[3.0, 2.5, 2.0, 1.8], evals=[3.1, 1.9], eval_every=40))
    assert _signs(findings) == ["too few points"]
    assert "overfitting needs 3" in findings[0]["summary"] and "no learning" not in findings[0]["summary"]


def test_format_findings():
    lines = format_findings(diagnose(_history(train=[3.0, 3.0, 3.0], evals=[3.0, 3.0, 3.0])))
    assert lines[0].startswith("no learning: eval loss 3.000 at step 0")
    assert lines[1].startswith("  try: a higher learning rate")


def test_the_end_of_run_summary_prints_the_diagnosis(capsys):
    from sft_ray.cli import _print_summary

    history = _history(train=[3.0, 3.0, 3.0], evals=[3.0, 3.0, 3.0])
    _print_summary(
        {"eval_loss_before": 3.0, "eval_loss_after": 3.0, "history": history, "diagnosis": diagnose(history)}
    )
    out = capsys.readouterr().out
    assert "diagnosis\n  no learning: eval loss 3.000 at step 0" in out
    assert "  try: a higher learning rate" in out
