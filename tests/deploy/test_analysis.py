"""Canary analysis: metrics from made-up request-log and score records, conditions, outcomes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmops.config import Config, MetricCondition, parse_config
from lmops.deploy.analysis import (
    FAILED, INCONCLUSIVE, SKIPPED, SUCCESSFUL, Sample, analyse, deployment_samples, judge, measure_store,
)
from lmops.deploy.expr import ExpressionError, parse_condition
from lmops.errors import LmopsError

from .conftest import T0, blue_green_endpoint, minutes, traffic


def req(dep, status=200, ttft=0.05, latency=0.2, moderation=None):
    return SimpleNamespace(deployment=dep, status_code=status, ttft_s=ttft, latency_s=latency, moderation=moderation)


def score(dep, prompt_nll=2.0, answer_nll=2.5, role="live"):
    return SimpleNamespace(deployment=dep, role=role, prompt_nll=prompt_nll, answer_nll=answer_nll)


METRICS = Config().rollout.metrics


def run(canary_reqs, stable_reqs, canary_scores=(), stable_scores=(), min_requests=20, metrics=METRICS):
    reqs, scores = [*canary_reqs, *stable_reqs], [*canary_scores, *stable_scores]
    return analyse(reqs, scores, reqs, scores, "green", "blue", metrics, min_requests, T0, T0 + minutes(2))


def test_a_broken_canary_fails_on_error_rate_and_names_it():
    result = run([req("green", 500, ttft=None)] * 30, [req("blue")] * 30)
    assert result.outcome == FAILED
    assert [m.metric for m in result.failed_metrics] == ["error_rate"]
    assert "error_rate: canary 1 (n=30) vs stable 0 (n=30): failed" in result.summary()


def test_a_good_canary_passes_every_metric():
    result = run([req("green", latency=0.22)] * 30, [req("blue")] * 30,
                 [score("green", 2.02, 2.51)] * 25, [score("blue")] * 25)
    assert result.outcome == SUCCESSFUL, result.summary()
    assert {m.metric: m.outcome for m in result.measurements} == dict.fromkeys(METRICS, SUCCESSFUL)


def test_too_few_requests_is_inconclusive_even_when_broken():
    result = run([req("green", 500)] * 5, [req("blue")] * 30)
    assert result.outcome == INCONCLUSIVE
    assert "fewer than 20 values" in result.summary()


def test_random_weights_fail_on_quality_against_a_trained_model():
    """prompt_nll near ln(vocab) (a char model: ln 80 = 4.4) against a trained model's 2.0; answers judged by
    the stable model as measured on the test models: a random model's 6.19 against the judge's own 1.05."""
    result = run([req("green")] * 30, [req("blue")] * 30, [score("green", 4.4, 6.19)] * 25,
                 [score("blue", 2.0, 1.05)] * 25)
    assert result.outcome == FAILED
    assert {m.metric for m in result.failed_metrics} == {"prompt_nll", "answer_nll"}


def test_answer_nll_tells_garbage_from_a_model_with_no_grey_zone():
    """The stable judge favours its own answers: an equally good model's score well above the stable's own
    (measured: 1.33 against 0.2-1.0) passes; a random model's (6.19 against 1.05) fails."""
    for stable_own, canary in ((0.2, 1.33), (0.5, 2.9), (1.05, 1.31)):
        result = run([req("green")] * 30, [req("blue")] * 30, [score("green", 2.0, canary)] * 25,
                     [score("blue", 2.0, stable_own)] * 25)
        assert result.outcome == SUCCESSFUL, (stable_own, canary, result)
    garbage = run([req("green")] * 30, [req("blue")] * 30, [score("green", 2.0, 6.19)] * 25,
                  [score("blue", 2.0, 1.05)] * 25)
    assert [m.metric for m in garbage.failed_metrics] == ["answer_nll"]


def test_latency_noise_passes_a_real_regression_fails():
    assert run([req("green", latency=0.3, ttft=0.07)] * 30, [req("blue")] * 30).outcome == SUCCESSFUL  # +50%: noise
    slow = run([req("green", latency=2.0)] * 30, [req("blue")] * 30)
    assert [m.metric for m in slow.failed_metrics] == ["p95_latency_s"]


def test_no_scores_on_either_side_are_skipped_one_side_only_is_inconclusive():
    result = run([req("green")] * 30, [req("blue")] * 30)
    assert {m.metric: m.outcome for m in result.measurements}["prompt_nll"] == SKIPPED
    assert result.outcome == SUCCESSFUL
    one_side = run([req("green")] * 30, [req("blue")] * 30, [], [score("blue")] * 25)
    assert one_side.outcome == INCONCLUSIVE


def test_shadow_rows_do_not_count_as_live_scores():
    samples = deployment_samples([], [score("green", 9.0, role="shadow"), score("green", 1.0)], "green")
    assert samples["prompt_nll"] == Sample(1.0, 1)


def test_p95_and_rates():
    reqs = [req("g", latency=float(i), moderation={"a": 1} if i <= 10 else None) for i in range(1, 101)]
    s = deployment_samples(reqs, [], "g")
    assert s["p95_latency_s"].value == pytest.approx(95.05)
    assert s["moderation_rate"] == Sample(0.1, 100)


def test_failure_is_checked_before_success_and_the_grey_zone_is_inconclusive():
    both = judge("x", Sample(5, 30), Sample(1, 30), "canary >= 0", "canary > stable * 2", 20)
    assert both.outcome == FAILED
    grey = judge("x", Sample(1.5, 30), Sample(1, 30), "canary <= stable * 1.2", "canary > stable * 2", 20)
    assert grey.outcome == INCONCLUSIVE and "neither" in grey.why


@pytest.mark.parametrize("text, canary, stable, expected", [
    ("canary <= stable + 0.01", 0.01, 0.0, True),
    ("canary <= stable + 0.01", 0.02, 0.0, False),
    ("canary > stable * 2 + 0.5", 2.6, 1.0, True),
    ("canary / stable <= 1.2", 1.0, 0.0, False),  # division by zero: inf, no error
    ("canary < 1 and stable < 1 or canary == 7", 7.0, 9.0, True),
    ("0 <= canary - stable < 0.5", 1.2, 1.0, True),
    ("not canary > -stable", -3.0, 1.0, True),
])
def test_conditions(text, canary, stable, expected):
    assert parse_condition(text).holds(canary, stable) is expected


@pytest.mark.parametrize("text, why", [
    ("__import__('os')", "Call is not allowed"),
    ("canary.real > 1", "Attribute is not allowed"),
    ("baseline > 1", "unknown name 'baseline'"),
    ("canary ** 2 > 1", r"only \+ - \* / are allowed"),
    ("canary > 'a'", "only numbers"),
    ("canary in [1]", "only < <= > >= == != compare"),
    ("(lambda: 1)()", "not allowed"),
    ("canary >", "not an expression"),
    ("", "a condition is an expression"),
])
def test_anything_else_is_refused(text, why):
    with pytest.raises(ExpressionError, match=why):
        parse_condition(text)


def test_a_bad_condition_is_refused_at_config_load_with_the_key():
    with pytest.raises(LmopsError, match=r"rollout.metrics.error_rate.*__import__\('os'\).*Call is not allowed"):
        parse_config({"rollout": {"metrics": {"error_rate": {"success": "__import__('os')", "failure": "canary > 1"}}}})
    with pytest.raises(LmopsError, match="unknown metric p99"):
        parse_config({"rollout": {"metrics": {"p99": {"success": "canary < 1", "failure": "canary > 1"}}}})
    with pytest.raises(LmopsError, match="ending at 100"):
        parse_config({"rollout": {"steps": [10, 50]}})


def test_min_samples_per_metric_overrides_min_requests():
    metrics = {"error_rate": MetricCondition(success="canary <= stable", failure="canary > stable + 0.5", min_samples=3)}
    assert run([req("green", 500)] * 3, [req("blue")] * 3, metrics=metrics).outcome == FAILED


def test_measure_store_reads_the_window_and_falls_back_to_the_baseline_for_stable(sqlite_store):
    store = sqlite_store
    blue_green_endpoint(store)
    traffic(store, "blue", T0, T0 + minutes(2), 40)
    traffic(store, "green", T0 + minutes(2), T0 + minutes(4), 40, status=500)
    traffic(store, "green", T0 + minutes(4), T0 + minutes(6), 40)  # outside the window below
    result = measure_store(store, "chat", "green", "blue", T0 + minutes(2), T0 + minutes(4), METRICS, 20,
                           baseline_since=T0)
    by = {m.metric: m for m in result.measurements}
    assert by["error_rate"].canary == 1.0 and by["error_rate"].canary_n == 40
    assert by["error_rate"].stable == 0.0 and by["error_rate"].stable_n == 40  # from the baseline
    assert result.outcome == FAILED
    no_baseline = measure_store(store, "chat", "green", "blue", T0 + minutes(2), T0 + minutes(4), METRICS, 20)
    assert no_baseline.outcome == INCONCLUSIVE  # stable served nothing in the window


def test_measure_store_falls_back_when_stable_has_requests_but_too_few_answer_scores(sqlite_store):
    """The last step: stable still served a few requests while the change spread (enough of them), but
    scored few answers; without the baseline the step stays inconclusive to its end (a CI failure)."""
    store = sqlite_store
    blue_green_endpoint(store)
    traffic(store, "blue", T0, T0 + minutes(2), 40)
    traffic(store, "blue", T0 + minutes(2), T0 + minutes(2.5), 25, prompt_nll=None, answer_nll=None)
    traffic(store, "blue", T0 + minutes(2.5), T0 + minutes(2.6), 3)
    traffic(store, "green", T0 + minutes(2), T0 + minutes(4), 40)
    window = (T0 + minutes(2), T0 + minutes(4))
    by = {m.metric: m for m in measure_store(store, "chat", "green", "blue", *window, METRICS, 20).measurements}
    assert by["answer_nll"].outcome == INCONCLUSIVE and by["answer_nll"].stable_n == 3  # what happened before
    result = measure_store(store, "chat", "green", "blue", *window, METRICS, 20, baseline_since=T0)
    by = {m.metric: m for m in result.measurements}
    assert by["answer_nll"].stable_n == 43 and by["error_rate"].stable_n == 68
    assert result.outcome == SUCCESSFUL, result.summary()
