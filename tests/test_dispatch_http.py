"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that answers from a history,
with injected faults; the Bedrock backend against botocore's Stubber."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchplan.core.catalog import PriceCatalog
from batchplan.core.history import History, synthetic_history
from batchplan.core.storage import Storage
from batchplan.dispatchers import DispatchOptions, ModelLimits, RetryPolicy, dispatch, get_backend, read_manifest
from batchplan.dispatchers.openai import parse_retry_after
from tests.support.factories import model_plan, queue_of, recorded
from tests.support.replay_server import Faults, ReplayServer

FAST_RETRY = RetryPolicy(max_attempts=6, base_delay_s=0.01, max_delay_s=0.2, down_after=5, down_cooldown_s=30)


@pytest.fixture(scope="module")
def history() -> History:
    return synthetic_history(300, 4, seed=11)


@pytest.fixture
def server(history: History) -> Iterator[ReplayServer]:
    with ReplayServer(history) as srv:
        yield srv


def openai(server: ReplayServer, history: History, **kwargs: object) -> object:
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    return get_backend("openai", base_url=server.base_url, catalog=catalog, api_key_env="BATCHPLAN_TEST_KEY", **kwargs)


def ledger_events(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for f in (out / "ledger").glob("*.jsonl") for line in f.read_text().splitlines() if line]


def _to_one_llm(
    queue: pl.DataFrame, model: str, backend: Any, out: Path, options: DispatchOptions, budget_usd: float = 10.0
) -> pl.DataFrame:
    """Dispatch every query of ``queue`` to ``model`` (no fallback) into ``out``."""
    return dispatch(model_plan(queue, model), queue, backend, budget_usd=budget_usd, out_uri=str(out), options=options)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_http_matches_replay(history: History, server: ReplayServer, tmp_path: Path, transport: str) -> None:
    queue = queue_of(history, 80)
    model = history.models[1]
    plan = model_plan(queue, model)
    backend = openai(server, history, transport=transport)
    results = dispatch(
        plan, queue, backend, budget_usd=10.0, out_uri=str(tmp_path / "http"), options=DispatchOptions(concurrency=8)
    )
    replayed = dispatch(
        plan, queue, get_backend("replay", history=history), budget_usd=10.0, out_uri=str(tmp_path / "replay")
    )
    assert results.drop("error").equals(replayed.drop("error"))
    stats = server.stats()
    assert stats["billed_calls"] == 80
    assert stats["billed_usd"] == pytest.approx(float(results["cost_usd"].sum()))


def test_faults_are_retried_and_spend_is_accounted(history: History, server: ReplayServer, tmp_path: Path) -> None:
    server.faults = Faults(
        rate_429=0.08,
        retry_after_s=0.05,
        rate_500=0.08,
        rate_slow=0.1,
        slow_s=0.02,
        rate_malformed=0.05,
        rate_reset=0.05,
        rate_refusal=0.05,
        seed=3,
    )
    queue = queue_of(history, 200)
    model = history.models[2]
    out = tmp_path / "run"
    backend = openai(server, history, timeout_s=2.0)
    results = _to_one_llm(queue, model, backend, out, DispatchOptions(concurrency=16, retry=FAST_RETRY))
    truth = recorded(history)
    done = results.filter(pl.col("status") == "done")
    assert done.height >= 195  # six attempts each: a query fails only on six faults in a row
    assert all(answer == truth[q, model][0] for q, answer in done.select("query_id", "answer").iter_rows())
    faults = server.stats()["faults"]
    assert {"429", "500", "malformed", "reset", "refusal", "slow"} <= set(faults)
    events = ledger_events(out)
    calls = [e for e in events if e["e"] == "c"]
    assert {e["s"] for e in calls} >= {"ok", "rate_limited", "server_error", "connection", "not_answer"}
    charged = sum(float(e["usd"]) for e in calls)  # type: ignore[arg-type]
    assert float(results["cost_usd"].sum()) == pytest.approx(charged)
    # unknown bills (resets, malformed bodies) are charged their reservation: never below the server's bill
    assert server.stats()["billed_usd"] <= charged + 1e-12
    refusals = [e for e in calls if e["s"] == "not_answer"]
    assert refusals
    assert all(e["why"] == "refusal" and "sorry" in str(e["raw"]) for e in refusals)
    manifest = read_manifest(Storage(), str(out))
    assert manifest["stats"]["rate_limit_pauses"] >= 1
    assert manifest["stats"]["retries"] >= 20


def test_timeouts_are_retried(history: History, server: ReplayServer, tmp_path: Path) -> None:
    server.faults = Faults(rate_timeout=0.2, timeout_s=1.0, seed=5)
    queue = queue_of(history, 40)
    backend = openai(server, history, timeout_s=0.25)
    results = _to_one_llm(queue, history.models[0], backend, tmp_path / "run", DispatchOptions(concurrency=20, retry=FAST_RETRY))
    assert (results["status"] == "done").all()
    timeouts = [e for e in ledger_events(tmp_path / "run") if e.get("s") == "timeout"]
    assert timeouts
    assert all(e.get("bk") is False and float(e["usd"]) > 0 for e in timeouts)


def test_budget_holds_under_concurrency_and_faults(history: History, server: ReplayServer, tmp_path: Path) -> None:
    server.faults = Faults(
        rate_429=0.1, retry_after_s=0.01, rate_500=0.1, rate_reset=0.05, rate_slow=0.2, slow_s=0.01, seed=9
    )
    queue = queue_of(history, 300)
    model = history.models[3]
    full = sum(c for (_, m), (_, c) in recorded(history).items() if m == model)
    budget = full * 0.3
    backend = openai(server, history)
    options = DispatchOptions(concurrency=64, retry=FAST_RETRY)
    results = _to_one_llm(queue, model, backend, tmp_path / "run", options, budget_usd=budget)
    assert results.height == 300
    assert float(results["cost_usd"].sum()) <= budget
    assert server.stats()["billed_usd"] <= budget
    assert results.filter(pl.col("status") == "deferred").height > 100
    assert results.filter(pl.col("status") == "done").height > 30


def test_down_model_falls_back(history: History, server: ReplayServer, tmp_path: Path) -> None:
    down, backup = history.models[0], history.models[1]
    server.faults = Faults(down_models=[down])
    queue = queue_of(history, 60)
    backend = openai(server, history)
    results = dispatch(
        model_plan(queue, down, [backup]),
        queue,
        backend,
        budget_usd=10.0,
        out_uri=str(tmp_path / "run"),
        options=DispatchOptions(concurrency=4, retry=FAST_RETRY),
    )
    assert (results["status"] == "done").all()
    assert results["error"].is_null().all()
    assert results["note"].str.starts_with(f"fallback to {backup}").fill_null(False).all()
    truth = recorded(history)
    assert all(a == truth[q, backup][0] for q, a in results.select("query_id", "answer").iter_rows())
    # the circuit opened: later queries skipped the down model without calling it
    assert server.stats()["faults"]["down"] < 60 * FAST_RETRY.max_attempts
    assert results["models_called"].to_list().count([backup]) > 0
    assert read_manifest(Storage(), str(tmp_path / "run"))["stats"]["circuit_trips"] >= 1


def test_not_answers_fail_with_raw_text(history: History, server: ReplayServer, tmp_path: Path) -> None:
    server.faults = Faults(rate_refusal=1.0)
    queue = queue_of(history, 5)
    backend = openai(server, history)
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.0)
    results = _to_one_llm(queue, history.models[0], backend, tmp_path / "run", DispatchOptions(retry=retry))
    assert (results["status"] == "failed").all()
    assert results["error"].str.contains("refusal").fill_null(False).all()
    assert results["error"].str.contains("sorry").fill_null(False).all()
    assert server.stats()["billed_calls"] == 10  # non-answers are billed, and retried once
    assert float(results["cost_usd"].sum()) == pytest.approx(server.stats()["billed_usd"])


def test_rate_limit_per_model(history: History, server: ReplayServer, tmp_path: Path) -> None:
    queue = queue_of(history, 12)
    backend = openai(server, history)
    limits = {"*": ModelLimits(concurrency=2, requests_per_minute=1200)}  # 20/s, burst 20
    started = time.monotonic()
    _to_one_llm(queue, history.models[0], backend, tmp_path / "a", DispatchOptions(concurrency=12, limits=limits))
    assert time.monotonic() - started < 5
    slow = {"*": ModelLimits(requests_per_minute=300)}  # 5/s, burst 5: 12 calls need >= 1.4 s
    started = time.monotonic()
    results = _to_one_llm(queue, history.models[0], backend, tmp_path / "b", DispatchOptions(concurrency=12, limits=slow))
    assert time.monotonic() - started >= 1.3
    assert (results["status"] == "done").all()


def test_api_key_is_sent_but_never_shown(
    history: History, server: ReplayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHPLAN_TEST_KEY", "sk-very-secret-123")
    backend = openai(server, history)
    assert "sk-very" not in repr(backend)
    assert "sk-very" not in repr(vars(backend))
    server.faults = Faults(rate_500=0.3, rate_reset=0.3, rate_malformed=0.2, rate_429=0.2)
    queue = queue_of(history, 40)
    once = DispatchOptions(retry=RetryPolicy(max_attempts=1))
    results = _to_one_llm(queue, history.models[0], backend, tmp_path / "run", once, budget_usd=1.0)
    assert server.stats()["authorized"] == server.stats()["requests"]
    errors = " ".join(e for e in results["error"].to_list() if e)
    assert "HTTP 500" in errors
    assert "connection" in errors
    assert "sk-very" not in errors
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"sk-very" not in path.read_bytes()


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


def test_offered_pairs_live_is_every_catalog_model(history: History, server: ReplayServer) -> None:
    queue = queue_of(history, 7)
    backend = openai(server, history)
    pairs = backend.offered_pairs(queue)  # type: ignore[attr-defined]
    assert pairs.height == 7 * len(history.models)


# --- Bedrock Converse through botocore's Stubber -----------------------------------------------------------


def _converse(text: str, tokens_in: int = 100, tokens_out: int = 1, stop: str = "end_turn") -> dict[str, object]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": stop,
        "usage": {"inputTokens": tokens_in, "outputTokens": tokens_out, "totalTokens": tokens_in + tokens_out},
        "metrics": {"latencyMs": 12},
    }


def test_bedrock_converse_with_stubber(history: History, tmp_path: Path) -> None:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    model = history.models[0]
    queue = queue_of(history, 3)
    labels = queue["labels"].to_list()
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    backend = get_backend("bedrock", catalog=catalog, client=client, model_map={model: "anthropic.claude-3-haiku"})
    with Stubber(client) as stub:
        first = queue.row(0, named=True)
        expected = {
            "modelId": "anthropic.claude-3-haiku",
            "messages": [{"role": "user", "content": [{"text": first["prompt"]}]}],
            "inferenceConfig": {"maxTokens": 16, "temperature": 0.0},
        }
        stub.add_response("converse", _converse(labels[0][0]), expected)
        stub.add_client_error("converse", service_error_code="ThrottlingException", http_status_code=429)
        stub.add_response("converse", _converse(f"Answer: {labels[1][-1]}"))
        stub.add_response("converse", _converse("I cannot answer that."))
        stub.add_response("converse", _converse("", stop="guardrail_intervened"))
        twice = DispatchOptions(concurrency=1, retry=RetryPolicy(max_attempts=2, base_delay_s=0.0))
        results = _to_one_llm(queue, model, backend, tmp_path / "run", twice, budget_usd=1.0)
        stub.assert_no_pending_responses()
    assert results["status"].to_list() == ["done", "done", "failed"]
    assert results["answer"].to_list()[:2] == [labels[0][0], labels[1][-1]]
    assert "refusal" in results["error"][2]
    price_in, price_out = history.prices.filter(pl.col("model") == model).row(0)[1:]
    assert results["cost_usd"][0] == pytest.approx((100 * price_in + price_out) / 1e6)
    assert results["cost_usd"][2] == pytest.approx(2 * (100 * price_in + price_out) / 1e6)


def test_retry_after_is_honoured(history: History, server: ReplayServer, tmp_path: Path) -> None:
    server.faults = Faults(rate_429=1.0, retry_after_s=0.25)
    queue = queue_of(history, 1)
    retry = RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=5.0)
    started = time.monotonic()
    backend = openai(server, history)
    results = _to_one_llm(queue, history.models[0], backend, tmp_path / "run", DispatchOptions(retry=retry), budget_usd=1.0)
    assert time.monotonic() - started >= 0.5  # two waits of Retry-After between three attempts
    assert results["status"].to_list() == ["failed"]
    assert "429" in results["error"][0]
    assert results["cost_usd"][0] == 0.0  # 429s are not billed
    assert [e["s"] for e in ledger_events(tmp_path / "run") if e["e"] == "c"] == ["rate_limited"] * 3


def test_cascade_over_http_uses_logprobs_like_replay(history: History, server: ReplayServer, tmp_path: Path) -> None:
    queue = queue_of(history, 60)
    cheap, dear = history.models[0], history.models[3]
    plan = model_plan(queue, cheap).with_columns(
        pl.lit("cascade").alias("kind"), pl.lit([cheap, dear]).alias("models"), pl.lit([0.6]).alias("thresholds")
    )
    over_http = dispatch(plan, queue, openai(server, history), budget_usd=10.0, out_uri=str(tmp_path / "http"))
    replayed = dispatch(
        plan, queue, get_backend("replay", history=history), budget_usd=10.0, out_uri=str(tmp_path / "replay")
    )
    assert over_http.drop("error").equals(replayed.drop("error"))
    lengths = over_http["models_called"].list.len()
    assert (lengths == 1).any()  # confident cheap answers stopped the cascade
    assert (lengths == 2).any()
    logprobs = [e.get("lp") for e in ledger_events(tmp_path / "http") if e["e"] == "c"]
    assert all(lp is not None for lp in logprobs)


def test_key_and_base_url_from_an_airflow_connection(
    history: History, server: ReplayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = {"conn_type": "http", "host": server.base_url, "password": "sk-from-airflow"}
    monkeypatch.setenv("AIRFLOW_CONN_BATCHPLAN_LLM", json.dumps(connection))
    catalog = PriceCatalog.from_history(history.prices, history.outcomes)
    backend = get_backend("openai", catalog=catalog, airflow_conn_id="batchplan_llm", api_key_env=None)
    assert "sk-from-airflow" not in repr(backend)
    queue = queue_of(history, 4)
    results = dispatch(model_plan(queue, history.models[0]), queue, backend, budget_usd=1.0, out_uri=str(tmp_path / "run"))
    assert (results["status"] == "done").all()
    assert server.stats()["authorized"] == 4


def test_replay_server_runs_as_a_module() -> None:
    import subprocess
    import sys
    import urllib.request

    args = [
        sys.executable,
        "-m",
        "tests.support.replay_server",
        "--synthetic",
        "50",
        "--models",
        "2",
        "--fault-500",
        "0.5",
    ]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        base = line.strip().rsplit(" ", 1)[-1].removesuffix("/v1")
        with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
            assert [m["id"] for m in json.load(response)["data"]] == ["synth-00", "synth-01"]
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as response:
            assert json.load(response)["billed_calls"] == 0
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def test_token_bucket_paces_tokens_per_minute() -> None:
    import asyncio

    from batchplan.dispatchers.limits import TokenBucket

    async def scenario() -> float:
        bucket = TokenBucket(per_minute=6_000)  # 100 tokens/s, burst 100
        started = time.monotonic()
        for _ in range(3):
            await bucket.take(60)  # 180 tokens: the burst, then ~0.8 s of refill
        return time.monotonic() - started

    assert 0.6 <= asyncio.run(scenario()) < 2.0


def test_model_names_are_mapped_to_the_provider(history: History, tmp_path: Path) -> None:
    model = history.models[1]
    with ReplayServer(history, aliases={f"vendor/{model}-v2": model}) as server:
        queue = queue_of(history, 10)
        plan = model_plan(queue, model)
        unmapped = dispatch(plan, queue, openai(server, history), budget_usd=1.0, out_uri=str(tmp_path / "a"))
        assert unmapped["status"].to_list() == ["done"] * 10  # the history's own name is served too
        mapped_backend = openai(server, history, model_map={model: f"vendor/{model}-v2"})
        mapped = dispatch(plan, queue, mapped_backend, budget_usd=1.0, out_uri=str(tmp_path / "b"))
        assert mapped.equals(unmapped)
        assert mapped["models_called"].to_list() == [[model]] * 10  # results speak the plan's names
        wrong = openai(server, history, model_map={model: "vendor/unknown"})
        failed = dispatch(
            plan,
            queue,
            wrong,
            budget_usd=1.0,
            out_uri=str(tmp_path / "c"),
            options=DispatchOptions(retry=RetryPolicy(max_attempts=1)),
        )
        assert (failed["status"] == "failed").all()
        assert failed["error"].str.contains("unavailable").all()


def test_live_backend_without_prices_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="needs catalog, its price list"):
        get_backend("openai", base_url="http://127.0.0.1:9/v1", catalog=None)


def test_output_caps_are_learned_per_task_and_llm() -> None:
    """max_tokens of an open task's calls: 2 x the p99 of what the history's answers ran, + 16, per (task, LLM);
    classification rows and pairs with too few answers (or no recorded lengths) keep the default."""
    from batchplan.dispatchers import OutputCaps

    rows = [("open", "a", None, n) for n in range(1, 101)]  # p99 (the higher rank) = 100 -> 2 x 100 + 16
    rows += [("open", "b", None, 2000) for _ in range(100)]  # capped at the default
    rows += [("open", "c", None, 5) for _ in range(10)]  # too few answers
    rows += [("cls", "a", ["A", "B"], 300) for _ in range(100)]  # classification: not an open task
    rows += [("code", "a", None, None) for _ in range(100)]  # lengths not recorded
    outcomes = pl.DataFrame(
        rows,
        schema={"task": pl.String, "model": pl.String, "labels": pl.List(pl.String), "tokens_out": pl.Int64},
        orient="row",
    )
    caps = OutputCaps.learn(outcomes)
    assert dict(caps.caps) == {("open", "a"): 216, ("open", "b"): 1024}
    assert caps.get("open", "c") == caps.get("code", "a") == caps.get(None, "a") == 1024
    assert OutputCaps.from_json(caps.to_json()) == caps


def test_max_tokens_cuts_an_open_answer_and_its_bill(tmp_path: Path) -> None:
    """The fault server honours max_tokens as an endpoint does: an answer recorded longer comes back cut
    (finish_reason "length"), billed at most max_tokens of output; the backend reports it ``truncated`` (not
    retried, not an answer), and the budget guard reserved the capped bound, not the flat one."""
    from batchplan.dispatchers import OutputCaps

    base = synthetic_history(40, 2, seed=5)
    long = pl.col("query_id").is_in(base.queries["query_id"].head(10).implode())
    outcomes = base.outcomes.with_columns(
        pl.when(long).then(400).otherwise(8).alias("tokens_out"), pl.lit("a free-text answer").alias("answer")
    )
    prices = base.prices.with_columns(pl.lit(1.0).alias("usd_per_mtok_in"), pl.lit(100.0).alias("usd_per_mtok_out"))
    outcomes = outcomes.join(prices, on="model").with_columns(
        ((pl.col("tokens_in") * pl.col("usd_per_mtok_in") + pl.col("tokens_out") * pl.col("usd_per_mtok_out")) / 1e6)
        .alias("cost_usd")
    ).select(base.outcomes.columns)
    history = History(base.queries.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("labels")), outcomes, prices)
    queue = queue_of(history, 40)
    model = history.models[0]
    caps = OutputCaps({(t, m): 32 for t in queue["task"].unique().to_list() for m in history.models})
    with ReplayServer(history) as server:
        options = DispatchOptions(output_caps=caps, retry=FAST_RETRY)
        results = _to_one_llm(queue, model, openai(server, history), tmp_path / "run", options)
        stats = server.stats()
    events = [e for e in ledger_events(tmp_path / "run") if e.get("e") == "c"]
    cut = [e for e in events if e["s"] == "truncated"]
    assert len(cut) == 10  # once each: a cut answer is not retried
    assert all(e["to"] == 32 for e in cut)
    assert all(e["why"] == "cut at max_tokens=32" for e in cut)
    assert stats["requests"] == stats["billed_calls"] == 40
    recorded_long = outcomes.filter(long & (pl.col("model") == model))["cost_usd"].sum()
    assert sum(e["usd"] for e in cut) == pytest.approx(recorded_long - 10 * (400 - 32) * 100 / 1e6)
    assert stats["billed_usd"] == pytest.approx(float(results["cost_usd"].sum()))
    assert results["status"].value_counts().sort("status").rows() == [("done", 30), ("failed", 10)]
    intents = [e for e in ledger_events(tmp_path / "run") if e.get("e") == "i"]
    assert max(float(e["r"]) for e in intents) < 0.01  # the flat bound reserves 1024 x $100/M = $0.1024


def test_a_cut_answer_is_billed_at_its_recorded_rate(tmp_path: Path) -> None:
    """A history billed above its price list (cascades_open's bills run ~3x list x usage): the fault server
    bills an answer cut at max_tokens at the rate its recorded bill was. Taking the uncut tokens off at the
    list price instead left a 405b answer recorded at 2048 tokens billed $0.0072 for 54 tokens (its bound:
    $0.0013), and a run in rounds over its budget (bench/rounds_faults.py, cascades_open at 50%)."""
    from batchplan.dispatchers import OutputCaps

    base = synthetic_history(20, 1, seed=5)
    prices = base.prices.with_columns(pl.lit(3.0).alias("usd_per_mtok_in"), pl.lit(3.0).alias("usd_per_mtok_out"))
    listed = (pl.col("tokens_in") * pl.col("usd_per_mtok_in") + pl.col("tokens_out") * pl.col("usd_per_mtok_out")) / 1e6
    outcomes = (
        base.outcomes.with_columns(pl.lit(2048).alias("tokens_out"), pl.lit("a free-text answer").alias("answer"))
        .join(prices, on="model")
        .with_columns((3 * listed).alias("cost_usd"))  # billed 3x the list price
        .select(base.outcomes.columns)
    )
    history = History(base.queries.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("labels")), outcomes, prices)
    queue = queue_of(history, 20)
    model = history.models[0]
    caps = OutputCaps({(t, model): 32 for t in queue["task"].unique().to_list()})
    with ReplayServer(history) as server:
        options = DispatchOptions(output_caps=caps, retry=FAST_RETRY)
        _to_one_llm(queue, model, openai(server, history), tmp_path / "run", options)
    cut = [e for e in ledger_events(tmp_path / "run") if e.get("e") == "c"]
    assert len(cut) == 20
    assert all(e["s"] == "truncated" for e in cut)
    tokens_in = dict(outcomes.filter(pl.col("model") == model).select("query_id", "tokens_in").iter_rows())
    for e in cut:  # 3x the list price of the tokens sent, where the list price off the uncut ones left ~30x
        assert e["usd"] == pytest.approx(3 * (tokens_in[e["q"]] + 32) * 3.0 / 1e6)


def test_a_drifted_llm_is_answered_from_its_degraded_source(history: History, tmp_path: Path) -> None:
    """``--drift LLM=OTHER``: the server answers LLM's calls with OTHER's recorded answers (LLM's own bill), and
    ``LLM:-0.3`` turns that share of its answers wrong, drawn from its right ones; the other LLMs answer as
    recorded. ``drifted_history`` is what the server answers from (what a bench scores against)."""
    from tests.support.replay_server import Drift, drifted_history

    queue = queue_of(history, 60)
    strong, weak = history.models[0], history.models[1]
    drift = [Drift.parse(f"{strong}={weak}")]
    with ReplayServer(history, drift=drift) as server:
        got = _to_one_llm(queue, strong, openai(server, history), tmp_path / "run", DispatchOptions(retry=FAST_RETRY))
        other = _to_one_llm(queue, weak, openai(server, history), tmp_path / "weak", DispatchOptions(retry=FAST_RETRY))
    answers = {q: a for (q, m), (a, _) in recorded(history).items() if m == weak}
    costs = {q: c for (q, m), (_, c) in recorded(history).items() if m == strong}
    assert {q: a for q, a in got.select("query_id", "answer").iter_rows()} == {q: answers[q] for q in queue["query_id"]}
    assert got["cost_usd"].to_list() == pytest.approx([costs[q] for q in got["query_id"]])
    assert other["answer"].to_list() == [answers[q] for q in other["query_id"]]

    before = history.outcomes.filter(pl.col("model") == strong)
    after = drifted_history(history, [Drift.parse(f"{strong}:-0.3")]).outcomes.filter(pl.col("model") == strong)
    assert float(after["correct"].mean()) == pytest.approx(float(before["correct"].mean()) - 0.3, abs=0.05)
    assert not (after["correct"] & ~before["correct"]).any()  # only right answers are turned
    judged = after.join(history.queries.select("query_id", "gold"), on="query_id")
    assert ((judged["answer"] == judged["gold"]) == judged["correct"]).all()
    for bad in ("nope", f"{strong}:0.2", f"{strong}={strong}", "no-such-llm:-0.1"):
        with pytest.raises(ValueError, match="--drift"):
            drifted_history(history, [Drift.parse(bad)])
