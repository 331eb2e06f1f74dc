"""Dispatch modes priced by the planners: the deadline, the batch/real-time rule, batch prices under the budget."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batchplan.app.round_replay import simulate_rounds
from batchplan.core.catalog import BATCH_TERMS, BatchTerms, PriceCatalog
from batchplan.core.errors import ContractError
from batchplan.core.history import History, synthetic_history
from batchplan.core.request import deadline_at
from batchplan.core.rounds import BATCH, REALTIME
from batchplan.plans.modes import BatchModes, SimulatedClock, batch_priced, turnaround_cdf
from batchplan.plans.posterior import Posterior, fit_posterior
from batchplan.plans.round_planner import PosteriorRoundPlanner
from batchplan.plans.templates import cross_fit_predictions
from batchplan.predictors import train_predictor

NIGHT = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "hours"),
    [("6h", 6.0), ("90m", 1.5), ("1h30m", 1.5), ("1.5h", 1.5), ("2d", 48.0), ("06:00Z", 8.0), ("23:30UTC", 1.5)],
)
def test_a_deadline_is_a_duration_or_the_next_hour_of_the_day(text: str, hours: float) -> None:
    assert (deadline_at(text, NIGHT) - NIGHT.timestamp()) / 3600 == pytest.approx(hours)


def test_an_hour_of_the_day_that_has_passed_is_tomorrows() -> None:
    assert (deadline_at("21:00Z", NIGHT) - NIGHT.timestamp()) / 3600 == pytest.approx(23.0)


@pytest.mark.parametrize("text", ["", "6x", "25:00", "h", "-1h", "0h", "6 hours", "6:0"])
def test_a_bad_deadline_names_the_field(text: str) -> None:
    with pytest.raises(ContractError, match="deadline") as error:
        deadline_at(text, NIGHT)
    assert "\n" not in str(error.value)
    assert error.value.fields == ("deadline",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("6x", "error: --deadline '6x' is neither a duration (6h, 90m, 1h30m) nor an hour of the day"),
        ("25:00", "error: --deadline '25:00' is neither a duration"),
        ("0m", "error: --deadline '0m' must be a positive duration"),
    ],
)
def test_a_bad_deadline_flag_is_one_line_and_exit_2(value: str, expected: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from batchplan.app.cli import app

    out = tmp_path / "r"
    args = ["run", "--queue", "q.jsonl", "--predictors", "m", "--out", str(out), "--budget-usd", "1"]
    result = CliRunner().invoke(app, [*args, "--deadline", value])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith(expected), lines[-1]
    assert not out.exists()  # refused before anything was written


def test_the_catalog_prices_batch_calls_per_llm() -> None:
    prices = pl.DataFrame(
        {
            "model": ["a", "b", "c"],
            "usd_per_mtok_in": [1.0, 2.0, 3.0],
            "usd_per_mtok_out": [1.0, 2.0, 3.0],
            "batch_discount": [None, 0.4, None],
        }
    )
    catalog = PriceCatalog.from_prices(prices).for_backend("openai")
    assert catalog.batch_discount("a") is None  # the price list says a has no batch API
    assert catalog.batch_discount("b") == 0.4
    assert PriceCatalog.from_prices(prices.drop("batch_discount")).for_backend("bedrock").batch_discount("c") == 0.5
    assert PriceCatalog.from_prices(prices.drop("batch_discount")).for_backend("replay").batch_discount("c") is None
    with pytest.raises(ContractError, match=r"batch_discount of b is 1\.5"):
        PriceCatalog.from_prices(prices.with_columns(pl.Series("batch_discount", [None, 1.5, None])))


def test_which_rounds_go_by_batch_before_a_deadline() -> None:
    terms = BatchTerms(typical_hours=1.0, worst_hours=24.0)
    modes = BatchModes({"a": 0.5}, terms, deadline=0.0, realtime_round_hours=0.25)
    # no deadline: every round by batch
    assert BatchModes({"a": 0.5}, terms).batch_share(1, 2) == 1.0
    # round 1 of 2 with 3 h left: the typical turnaround fits before the real-time round kept for round 2
    assert modes.batch_share(1, 2, hours_left=3.0) == 1.0
    assert modes.batch_share(1, 2, hours_left=1.1) == 0.0  # 1.1 - 0.25 < 1 h: real time
    # the last round: batch only as likely as its turnaround fits what is left; 1 once the worst case fits
    assert modes.batch_share(2, 2, hours_left=2.0) == pytest.approx(turnaround_cdf(2.0, terms))
    assert 0.5 < modes.batch_share(2, 2, hours_left=2.0) < 0.6
    assert modes.batch_share(2, 2, hours_left=25.0) == 1.0
    assert BatchModes({}, terms).batch_share(1, 2) == 0.0  # no LLM with a batch API


def test_single_shot_with_the_batch_api_is_planned_at_batch_prices() -> None:
    predictions = pl.DataFrame(
        {
            "query_id": ["q", "q"],
            "model": ["a", "b"],
            "p_correct": [0.5, 0.9],
            "cost_usd": [1.0, 4.0],
            "cost_high_usd": [2.0, 8.0],
        }
    )
    priced = batch_priced(predictions, {"b": 0.5})
    assert priced["cost_usd"].to_list() == [1.0, 2.0]
    assert priced["cost_high_usd"].to_list() == [2.0, 4.0]


# --- the round planner choosing modes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> tuple[History, Posterior, pl.DataFrame]:
    """A synthetic history (one task, 4 LLMs, logprobs higher when right), its posterior, test predictions."""
    history = synthetic_history(900, 4, n_tasks=1, test_fraction=0.4, seed=3)
    rng = np.random.default_rng(0)
    correct = history.outcomes["correct"].to_numpy()
    confidence = np.where(correct, rng.uniform(0.5, 1.0, len(correct)), rng.uniform(0.15, 0.8, len(correct)))
    history = History(
        queries=history.queries,
        outcomes=history.outcomes.with_columns(pl.Series("logprob", np.log(confidence))),
        prices=history.prices,
    )
    train = history.split("train")
    oof = cross_fit_predictions(train, lambda part: train_predictor(part, name="lightgbm", seed=0))
    posterior = fit_posterior(train, oof, validate=True)
    predictor = train_predictor(train, name="lightgbm", seed=0)
    test = history.split("test")
    return history, posterior, predictor.predict(test.as_queue(), test.outcomes.select("query_id", "model"), None)


def _night(
    fitted: tuple[History, Posterior, pl.DataFrame],
    hours: float | None,
    fraction: float,
    batch: bool = True,
    terms: BatchTerms = BATCH_TERMS["openai"],
):
    history, posterior, predictions = fitted
    test = history.split("test")
    queue = test.as_queue()
    budget = fraction * float(test.outcomes.group_by("model").agg(pl.col("cost_usd").sum())["cost_usd"].max())
    clock = SimulatedClock(terms)
    models = sorted(predictions["model"].unique().to_list())
    discounts = dict.fromkeys(models, 0.5)
    modes = BatchModes(discounts, terms, deadline=None if hours is None else hours * 3600, clock=clock)
    planner = PosteriorRoundPlanner(posterior, modes=modes if batch else None)
    recorded = test.outcomes.select("query_id", "model", "answer", "cost_usd", "logprob", "tokens_in", "tokens_out")
    run = simulate_rounds(
        planner, queue, predictions, recorded, budget, 2, discounts=discounts, after_round=clock.after_round
    )
    return run, budget


def _modes_by_round(run) -> dict[int, dict[str, int]]:  # type: ignore[no-untyped-def]
    counts = run.observations.group_by("round", "mode").len().sort("round", "mode").iter_rows()
    out: dict[int, dict[str, int]] = {}
    for k, mode, n in counts:
        out.setdefault(k, {})[mode] = n
    return out


def test_on_a_short_night_the_first_stage_goes_by_batch_and_escalations_in_real_time(
    fitted: tuple[History, Posterior, pl.DataFrame],
) -> None:
    run, budget = _night(fitted, hours=3.0, fraction=0.5)
    by_round = _modes_by_round(run)
    assert set(by_round[1]) == {BATCH}  # stage 1: every call by batch (3 h leave its typical hour)
    assert by_round[2].get(REALTIME, 0) > 0  # escalations: 2 h left, a batch would most likely be late
    assert by_round[2].get(REALTIME, 0) > by_round[2].get(BATCH, 0)
    assert by_round[1][BATCH] > by_round[2][REALTIME]  # a cascade: few escalations
    assert run.spent_usd <= budget + 1e-12


def test_a_long_night_goes_all_by_batch_and_one_too_short_all_in_real_time(
    fitted: tuple[History, Posterior, pl.DataFrame],
) -> None:
    long, _ = _night(fitted, hours=30.0, fraction=0.5)
    assert {m for modes in _modes_by_round(long).values() for m in modes} == {BATCH}
    short, _ = _night(fitted, hours=0.5, fraction=0.5)
    assert {m for modes in _modes_by_round(short).values() for m in modes} == {REALTIME}


def test_an_llm_below_the_minimum_record_count_is_planned_and_priced_in_real_time(
    fitted: tuple[History, Posterior, pl.DataFrame],
) -> None:
    """Bedrock refuses a job under its per-model minimum (100 records by default): the planner knows it, so a round's few
    calls to an LLM (the escalations) are planned in real time at the on-demand price, not at batch prices
    the sender would then not get."""
    terms = BatchTerms(min_records=250)  # above this night's escalations to one LLM (~230), below its first stage
    run, budget = _night(fitted, hours=None, fraction=0.5, terms=terms)
    counts = run.observations.group_by("round", "model", "mode").len()
    batch = counts.filter(pl.col("mode") == BATCH)
    assert batch.height > 0  # round 1's first stage still goes by batch
    assert (batch["len"] >= terms.min_records).all(), batch  # no batch job below the minimum
    assert counts.filter(pl.col("mode") == REALTIME).height > 0  # the escalations, in real time
    realtime = run.observations.filter(pl.col("mode") == REALTIME)
    recorded = fitted[0].outcomes.select("query_id", "model", pl.col("cost_usd").alias("recorded"))
    priced = realtime.join(recorded, on=["query_id", "model"])
    assert priced["cost_usd"].to_list() == pytest.approx(priced["recorded"].to_list())  # the on-demand price
    assert run.spent_usd <= budget + 1e-12
    # without the minimum (OpenAI's terms) the same night sends its escalations by batch, in small jobs
    loose, _ = _night(fitted, hours=None, fraction=0.5)
    small = loose.observations.filter(pl.col("mode") == BATCH).group_by("round", "model").len()
    assert (small["len"] < terms.min_records).any()


def test_at_batch_prices_the_budget_holds_and_buys_more(fitted: tuple[History, Posterior, pl.DataFrame]) -> None:
    history, _, _ = fitted
    truth = dict(history.queries.select("query_id", "gold").iter_rows())
    realtime, budget = _night(fitted, hours=None, fraction=0.2, batch=False)
    batch, _ = _night(fitted, hours=None, fraction=0.2)
    assert batch.spent_usd <= budget + 1e-12
    assert realtime.spent_usd <= budget + 1e-12
    # what was charged is the recorded cost at half price, call by call
    assert set(batch.observations["mode"].to_list()) == {BATCH}

    def accuracy(run) -> float:  # type: ignore[no-untyped-def]
        return float(np.mean([truth[q] == a for q, a in run.results.select("query_id", "answer").iter_rows()]))

    assert accuracy(batch) > accuracy(realtime)
    # the planner's cost drift reads batch calls at the batch price: no phantom halving of real-time prices
    planner_drift = batch.diagnostics[-1]["cost_drift"]
    assert all(0.5 < d < 2.0 for d in planner_drift.values())


def test_a_deadline_without_the_batch_api_is_refused(tmp_path: Path) -> None:
    from batchplan.app.pipeline import Job, run_job
    from batchplan.core.request import PlanRequest
    from batchplan.core.storage import Storage

    job = Job(queue_uri="q", predictors_uri="m", out_uri=str(tmp_path / "r"), request=PlanRequest(budget_usd=1.0))
    job.deadline = NIGHT.timestamp()
    with pytest.raises(ContractError, match="deadline bounds the rounds sent by a provider's batch API") as error:
        run_job(job, Storage())
    assert error.value.fields == ("deadline", "batch_api")
    assert not (tmp_path / "r").exists()


def test_the_batch_api_needs_a_backend_that_has_one() -> None:
    from types import SimpleNamespace

    from batchplan.app.pipeline import Job, batch_modes
    from batchplan.core.request import PlanRequest

    prices = pl.DataFrame({"model": ["a"], "usd_per_mtok_in": [1.0], "usd_per_mtok_out": [2.0]})
    predictions = pl.DataFrame({"query_id": ["q"], "model": ["a"]})
    request = PlanRequest(budget_usd=1.0)
    replay = SimpleNamespace(catalog=PriceCatalog.from_prices(prices).for_backend("replay"))
    job = Job(queue_uri="q", predictors_uri="m", out_uri="o", request=request, backend="replay", batch_api=True)
    with pytest.raises(ContractError, match="the replay backend has no batch API"):
        batch_modes(job, replay, predictions)  # type: ignore[arg-type]
    bedrock = SimpleNamespace(catalog=PriceCatalog.from_prices(prices).for_backend("bedrock"))
    job = Job(queue_uri="q", predictors_uri="m", out_uri="o", request=request, backend="bedrock", batch_api=True, deadline=5.0)
    # one query: no job can reach Bedrock's minimum of 100 records, so no LLM is offered a batch price
    assert dict(batch_modes(job, bedrock, predictions).discounts) == {}  # type: ignore[arg-type]
    predictions = pl.DataFrame({"query_id": [f"q{i}" for i in range(100)], "model": ["a"] * 100})
    modes = batch_modes(job, bedrock, predictions)  # type: ignore[arg-type]
    assert dict(modes.discounts) == {"a": 0.5}
    assert modes.terms.min_records == 100
    assert modes.deadline == 5.0


def test_bedrocks_minimum_is_the_accounts_quota_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """BATCHPLAN_BEDROCK_BATCH_MIN_RECORDS (the account's service quota, 100 by default): the planner offers a
    batch price to a night of 20 queries, and the Bedrock sender's jobs need as many records."""
    from types import SimpleNamespace

    from batchplan.app.pipeline import backend_batch_modes
    from batchplan.core.catalog import batch_terms
    from batchplan.core.settings import get_settings
    from batchplan.dispatchers.bedrock_batch import BedrockBatchSender

    prices = pl.DataFrame({"model": ["a"], "usd_per_mtok_in": [1.0], "usd_per_mtok_out": [2.0]})
    predictions = pl.DataFrame({"query_id": [f"q{i}" for i in range(20)], "model": ["a"] * 20})
    bedrock = SimpleNamespace(catalog=PriceCatalog.from_prices(prices).for_backend("bedrock"))
    assert dict(backend_batch_modes("bedrock", bedrock, predictions).discounts) == {}  # type: ignore[arg-type]
    monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_MIN_RECORDS", "20")
    get_settings.cache_clear()
    try:
        modes = backend_batch_modes("bedrock", bedrock, predictions)  # type: ignore[arg-type]
        assert dict(modes.discounts) == {"a": 0.5}
        assert modes.terms.min_records == 20
        sender = BedrockBatchSender(None, None, None, "bucket", "arn:role", None)  # type: ignore[arg-type]
        assert sender.terms.min_records == 20
        assert batch_terms("openai") == BATCH_TERMS["openai"]
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert batch_terms("bedrock") == BATCH_TERMS["bedrock"]
