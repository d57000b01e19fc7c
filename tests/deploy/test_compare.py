"""endpoint compare's summary, pure over score records."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest

from lmops.deploy.compare import mean_ci, parse_duration, summarise
from lmops.errors import LmopsError


def row(dep, rid, role="live", answer_nll=2.0, prompt_nll=1.0, agree=None, flagged=False, latency=0.1, error=None,
        tokens=8, finish="length", ttft=0.02):
    return SimpleNamespace(deployment=dep, request_id=rid, role=role, answer_nll=answer_nll, prompt_nll=prompt_nll,
                           agree=agree, flagged=flagged, latency_s=latency, error=error, completion_tokens=tokens,
                           finish_reason=finish, ttft_s=ttft)


def test_pairs_agreement_and_paired_difference():
    rows = [row("blue", f"r{i}", answer_nll=2.0 + i / 10) for i in range(10)]
    rows += [row("green", f"r{i}", "shadow", answer_nll=2.5 + i / 10, agree=i < 3, flagged=i == 0) for i in range(10)]
    blue, green = summarise(rows)
    assert (blue.deployment, blue.live, blue.shadow, green.shadow) == ("blue", 10, 0, 10)
    assert green.agreement == pytest.approx(0.3) and green.flag_rate == pytest.approx(0.1)
    assert green.answer_nll_vs_live.mean == pytest.approx(0.5) and green.answer_nll_vs_live.n == 10
    assert green.answer_nll_vs_live.high - green.answer_nll_vs_live.low == pytest.approx(0, abs=1e-9)  # same gap each
    assert blue.answer_nll_vs_live is None and blue.agreement is None


def test_length_stop_reasons_ttft_and_latency_per_deployment():
    rows = [row("blue", f"r{i}", tokens=10 + i, finish="stop" if i < 3 else "length", ttft=0.01 * (i + 1),
                latency=0.1 * (i + 1)) for i in range(10)]
    rows += [row("green", f"r{i}", "shadow", tokens=4, finish="length", ttft=None, latency=0.5) for i in range(4)]
    rows.append(row("green", "x", "shadow", tokens=None, finish=None, ttft=None, latency=None))  # nothing stored
    blue, green = summarise(rows)
    assert blue.answer_tokens.mean == pytest.approx(14.5) and blue.answer_tokens.n == 10
    expected = mean_ci([10.0 + i for i in range(10)])
    assert (blue.answer_tokens.low, blue.answer_tokens.high) == pytest.approx((expected.low, expected.high))
    assert blue.stop_reasons == pytest.approx({"length": 0.7, "stop": 0.3})
    assert list(blue.stop_reasons) == ["length", "stop"]  # largest share first
    assert blue.ttft_s.mean == pytest.approx(0.055) and blue.ttft_s.low < 0.055 < blue.ttft_s.high
    assert blue.latency_s.mean == pytest.approx(0.55) and blue.latency_s.n == 10
    assert blue.latency_s.low == pytest.approx(mean_ci([0.1 * (i + 1) for i in range(10)]).low)
    # green: the row without values counts in rows but in none of the means or shares
    assert green.rows == 5 and green.answer_tokens.n == 4 and green.stop_reasons == {"length": 1.0}
    assert green.ttft_s is None and green.latency_s.mean == pytest.approx(0.5) and green.latency_s.n == 4
    assert green.latency_s.format(".2f") == "0.50 ± 0.00"


def test_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert ci.mean == 2.5 and ci.low == pytest.approx(2.5 - 3.182446 * 1.290994 / 2, rel=1e-5)
    assert mean_ci([]) is None and mean_ci([3.0]).low is None and str(mean_ci([3.0])) == "3.000"


def test_durations():
    assert parse_duration("90s") == timedelta(seconds=90) and parse_duration("2m") == timedelta(minutes=2)
    assert parse_duration("1.5h") == timedelta(minutes=90) and parse_duration("30") == timedelta(seconds=30)
    for bad in ("", "0s", "-1m", "1w", "soon"):
        with pytest.raises(LmopsError, match="positive number with a unit"):
            parse_duration(bad)


def test_feedback_per_deployment():
    from lmops.deploy.compare import summarise_feedback

    fb = [SimpleNamespace(deployment="blue", score=s) for s in (1.0, 0.0, 1.0, 1.0)]
    fb.append(SimpleNamespace(deployment="green", score=0.5))
    blue, green, red = summarise_feedback(fb, ["blue"] * 8 + ["green"] * 2 + ["red"])
    assert (blue.feedback, blue.requests, blue.rate) == (4, 8, 0.5)
    assert blue.score.mean == pytest.approx(0.75) and blue.score.low < 0.75 < blue.score.high
    assert (green.feedback, green.rate, green.score.mean, green.score.low) == (1, 0.5, 0.5, None)
    assert (red.feedback, red.rate, red.score) == (0, 0.0, None)
    assert str(blue.score).startswith("0.750 ± ")
