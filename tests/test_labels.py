"""Learning in production, the data half: every call of a run recorded as an outcome, late labels joined into
a run (idempotently, unknown ids reported), and training from runs (silver weighted below gold and in no
metric; an LLM seen only in runs learned on its own rows)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from batchplan.app.cli import app
from batchplan.app.labels import join_labels, read_label_file
from batchplan.app.outcomes import runs_history
from batchplan.core.contracts import LABEL_SCHEMA, LIVE_OUTCOME_SCHEMA, SILVER
from batchplan.core.history import History, combine_histories, synthetic_history
from batchplan.core.storage import Storage
from batchplan.predictors import train_predictor
from tests.support.factories import run_dir_of, write_history
from tests.support.replay_server import ReplayServer

runner = CliRunner()


def _invoke(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def history() -> History:
    return synthetic_history(360, 4, seed=21)


@pytest.fixture(scope="module")
def setup(history: History, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A history directory, a predictor trained on its train split, and a queue of its test split."""
    root = tmp_path_factory.mktemp("labels")
    history_dir = write_history(history, root / "history")
    _invoke(["train", "--history", history_dir, "--out", str(root / "models"), "--predictor", "prior", "--no-templates"])
    queue = history.as_queue("test").head(60)
    queue.write_ndjson(root / "queue.jsonl")
    return {"history": history_dir, "models": str(root / "models"), "queue": str(root / "queue.jsonl"), "root": str(root)}


@pytest.fixture(scope="module")
def server(history: History) -> Iterator[ReplayServer]:
    with ReplayServer(history) as srv:
        yield srv


def _live_run(setup: dict[str, str], server: ReplayServer, out: Path, *extra: str) -> Path:
    _invoke(
        [
            "run",
            "--queue",
            setup["queue"],
            "--predictors",
            setup["models"],
            "--budget-usd",
            "1",
            "--backend",
            "openai",
            "--base-url",
            server.base_url,
            "--prices",
            str(Path(setup["history"]) / "models.csv"),
            "--out",
            str(out),
            *extra,
        ]
    )
    return out


def _ledger_calls(out: Path) -> int:
    seen = set()
    for ledger in out.rglob("ledger/*.jsonl"):
        for line in ledger.read_text().splitlines():
            event = json.loads(line)
            if event.get("e") == "c":
                seen.add((str(ledger.parent), event["q"], event["c"]))
    return len(seen)


@pytest.mark.parametrize("rounds", ["1", "2"])
def test_a_live_run_records_every_call_with_no_correctness(
    setup: dict[str, str], server: ReplayServer, tmp_path: Path, rounds: str
) -> None:
    out = _live_run(setup, server, tmp_path / "live", "--rounds", rounds)
    outcomes = pl.read_parquet(out / "outcomes.parquet")
    assert outcomes.schema == LIVE_OUTCOME_SCHEMA
    assert outcomes.height == _ledger_calls(out) > 0
    # the test server answers from the history, but a live run knows no gold: nothing is scored
    assert outcomes["correct"].is_null().all()
    assert outcomes["label_source"].is_null().all()
    ok = outcomes.filter(pl.col("status") == "ok")
    assert ok.height
    assert ok["answer"].is_not_null().all()
    assert ok["latency_ms"].is_not_null().all()
    assert ok["tokens_in"].is_not_null().all()
    assert (ok["cost_usd"] > 0).all()
    assert set(outcomes["round"].unique()) <= set(range(1, int(rounds) + 1))
    # every call paid is an outcome: the delivered answers' and the audits' reference calls (same query ids)
    assert outcomes["cost_usd"].sum() == pytest.approx(json.loads((out / "report.json").read_text())["spent_usd"])
    assert outcomes["task"].is_not_null().all()
    queries = pl.read_parquet(out / "queries.parquet")
    assert queries["gold"].is_null().all()
    assert queries.height == 60
    assert (out / "models.csv").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"] is None


@pytest.fixture
def live_run(setup: dict[str, str], server: ReplayServer, tmp_path: Path) -> Path:
    return _live_run(setup, server, tmp_path / "run")


def _gold(history: History, ids: list[str]) -> pl.DataFrame:
    return history.queries.filter(pl.col("query_id").is_in(ids)).select("query_id", "gold").sort("query_id")


def test_labels_join_idempotently_and_the_report_measures_accuracy(
    live_run: Path, history: History, tmp_path: Path
) -> None:
    results = pl.read_parquet(live_run / "results.parquet")
    ids = results["query_id"].sort().head(20).to_list()
    labels = _gold(history, ids).with_columns(pl.col("gold").str.to_lowercase())  # matched as answers are: "b" is B
    labels.write_csv(tmp_path / "labels.csv")
    line = _invoke(["label", str(live_run), str(tmp_path / "labels.csv")])
    assert "20 of 20 labels matched (20 new, 0 changed)" in line
    outcomes = pl.read_parquet(live_run / "outcomes.parquet")
    scored = outcomes.filter(pl.col("correct").is_not_null())
    assert set(scored["query_id"]) <= set(ids)
    assert scored.height > 0
    assert (scored["label_source"] == "gold").all()
    assert outcomes.filter(~pl.col("query_id").is_in(ids))["correct"].is_null().all()
    gold = dict(_gold(history, ids).iter_rows())
    ok = scored.filter(pl.col("status") == "ok")
    assert ok["correct"].to_list() == [gold[q] == a for q, a in ok.select("query_id", "answer").iter_rows()]
    report = json.loads((live_run / "report.json").read_text())
    delivered = results.filter(pl.col("query_id").is_in(ids))
    expected = sum(s == "done" and a == gold[q] for q, a, s in delivered.select("query_id", "answer", "status").iter_rows())
    assert report["accuracy"] == pytest.approx(expected / 20)
    assert report["accuracy_known_for"] == 20
    assert report["accuracy_source"] == "labels"
    assert "over 20 labelled queries" in (live_run / "report.md").read_text()
    # the same file again changes nothing: not the labels, not the outcomes, not the report
    files = {name: (live_run / name).read_bytes() for name in ("labels.parquet", "outcomes.parquet", "report.json")}
    again = _invoke(["label", str(live_run), str(tmp_path / "labels.csv")])
    assert "(0 new, 0 changed)" in again
    assert {name: (live_run / name).read_bytes() for name in files} == files
    stored = pl.read_parquet(live_run / "labels.parquet")
    assert stored.schema == LABEL_SCHEMA
    assert stored.height == 20
    assert stored["gold"].to_list() == _gold(history, ids)["gold"].to_list()  # the label, not its spelling


def test_a_label_for_an_unknown_query_id_is_reported_not_dropped(
    live_run: Path, history: History, tmp_path: Path
) -> None:
    ids = pl.read_parquet(live_run / "results.parquet")["query_id"].sort().head(3).to_list()
    rows = [*_gold(history, ids).iter_rows(), ("nope-1", "A"), ("nope-2", "B")]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps({"query_id": q, "gold": g}) + "\n" for q, g in rows))
    line = _invoke(["label", str(live_run), str(tmp_path / "labels.jsonl")])
    assert "3 of 5 labels matched" in line
    assert "2 labels name query_ids this run does not have (kept, not scored): nope-1, nope-2" in line
    stored = pl.read_parquet(live_run / "labels.parquet")
    assert {"nope-1", "nope-2"} <= set(stored["query_id"])
    # a file none of whose labels names a query of the run is another run's: refused, nothing written
    pl.DataFrame({"query_id": ["x1", "x2"], "gold": ["A", "B"]}).write_parquet(tmp_path / "other.parquet")
    before = (live_run / "labels.parquet").read_bytes()
    refused = _invoke(["label", str(live_run), str(tmp_path / "other.parquet")], code=2)
    assert refused.startswith("error:")
    assert "none of its 2 labels names a query of" in refused
    assert (live_run / "labels.parquet").read_bytes() == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("query_id,label\nq1,A\n", "missing column(s) gold"),
        ("query_id,gold\nq1,A\nq2,\n", "row 2: field 'gold' is empty"),
        ("query_id,gold\nq1,A\nq1,B\n", "rows 1, 2: query_id 'q1' has different gold labels"),
    ],
)
def test_a_malformed_label_file_names_the_row_and_field(live_run: Path, tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    assert message in _invoke(["label", str(live_run), str(tmp_path / "bad.csv")], code=2)


def test_a_gold_outside_the_query_labels_is_refused_naming_the_row(live_run: Path, tmp_path: Path) -> None:
    first = pl.read_parquet(live_run / "queries.parquet").row(0, named=True)
    pl.DataFrame({"query_id": [first["query_id"]], "gold": ["ZZZ"]}).write_csv(tmp_path / "bad.csv")
    line = _invoke(["label", str(live_run), str(tmp_path / "bad.csv")], code=2)
    assert f"row 1: field 'gold' 'ZZZ' is not one of query {first['query_id']!r}'s labels" in line


def test_open_task_labels_are_kept_and_counted_unscorable(live_run: Path, history: History) -> None:
    storage = Storage()
    queries = pl.read_parquet(live_run / "queries.parquet")
    opened = queries["query_id"].head(4).to_list()
    queries.with_columns(
        pl.when(pl.col("query_id").is_in(opened)).then(None).otherwise(pl.col("labels")).alias("labels")
    ).write_parquet(live_run / "queries.parquet")
    got = join_labels(storage, str(live_run), _gold(history, opened), source_file="open.csv")
    assert got.matched == 4
    assert got.unscorable == 4
    assert got.n == 0
    assert got.accuracy is None
    assert "4 labelled queries of open tasks unscorable (no judge)" in got.line()
    outcomes = pl.read_parquet(live_run / "outcomes.parquet")
    assert outcomes["correct"].is_null().all()
    assert pl.read_parquet(live_run / "labels.parquet").height == 4


def test_silver_is_weighted_below_gold_and_never_counted_as_gold(tmp_path: Path) -> None:
    full = synthetic_history(500, 4, seed=5)
    base_ids = full.queries["query_id"].head(250)
    base, live = full.subset(base_ids), full.subset(full.queries["query_id"].tail(250))
    audited = "synth-00"
    runs = runs_history(Storage(), [run_dir_of(live, tmp_path / "run", silver={audited})])
    silver = runs.outcomes.filter(pl.col("label_source") == SILVER)
    assert set(silver["model"]) == {audited}
    assert (silver["weight"] < 1).all()
    assert (runs.outcomes.filter(pl.col("label_source") == "gold")["weight"] == 1).all()
    predictor = train_predictor(combine_histories([base, runs]), name="lightgbm", seed=0)
    validation = predictor.metadata["validation"]
    gold_rows = base.outcomes.height + runs.outcomes.height - silver.height
    # every metric is over the gold rows only: the audited LLM is scored on its bundled rows alone
    assert validation["overall"]["n"] == gold_rows
    assert validation["per_model"][audited]["n"] == base.outcomes.filter(pl.col("model") == audited).height
    assert predictor.metadata["training_data"]["silver_rows"] == silver.height
    # and silver weighs less than gold: the same rows as gold move the audited LLM's prior further
    as_gold = runs_history(Storage(), [run_dir_of(live, tmp_path / "gold")])
    lifted = live.outcomes.with_columns(
        pl.when(pl.col("model") == audited).then(pl.lit(True)).otherwise(pl.col("correct")).alias("correct")
    )
    for frame in (runs, as_gold):
        object.__setattr__(frame, "outcomes", frame.outcomes.drop("correct").join(
            lifted.select("query_id", "model", "correct"), on=["query_id", "model"]
        ))
    prior = {}
    for name, frame in (("silver", runs), ("gold", as_gold)):
        fitted = train_predictor(combine_histories([base, frame]), name="prior", seed=0)
        prior[name] = fitted.priors.model.filter(pl.col("model") == audited)["acc"].item()
    base_acc = float(base.outcomes.filter(pl.col("model") == audited)["correct"].mean())  # type: ignore[arg-type]
    assert base_acc < prior["silver"] < prior["gold"]


def test_a_new_llm_seen_only_in_live_runs_gets_its_own_estimates(setup: dict[str, str], tmp_path: Path) -> None:
    """An LLM onboarded last week: no bundled history has it; a labelled run does, and it is far better than
    its price suggests. Trained with --from-run, the predictor knows it by name, from its own rows."""
    full = synthetic_history(400, 5, seed=8)
    newbie = "newbie-1"
    bundled = full.subset(full.queries["query_id"]).outcomes.filter(pl.col("model") != "synth-04")
    history_dir = write_history(
        History(full.queries, bundled, full.prices.filter(pl.col("model") != "synth-04")), tmp_path / "bundled"
    )
    # the new LLM: cheap (synth-00's price) and right on every run query it answered
    run_queries = full.queries.filter(pl.col("split") == "test")
    run_outcomes = (
        full.outcomes.filter((pl.col("model") == "synth-00") & pl.col("query_id").is_in(run_queries["query_id"].implode()))
        .join(run_queries.select("query_id", "gold"), on="query_id")
        .with_columns(pl.lit(newbie).alias("model"), pl.col("gold").alias("answer"), pl.lit(True).alias("correct"))
        .drop("gold")
    )
    prices = full.prices.filter(pl.col("model") == "synth-00").with_columns(pl.lit(newbie).alias("model"))
    run_dir = run_dir_of(History(run_queries, run_outcomes, prices), tmp_path / "run")
    out = tmp_path / "models"
    line = _invoke(["train", "--history", history_dir, "--out", str(out), "--from-run", run_dir, "--no-templates"])
    assert f"LLMs seen only in runs: {newbie}" in line
    from batchplan.predictors import load_predictor

    predictor = load_predictor(Storage(), str(out))
    assert newbie in predictor.metadata["models"]
    assert newbie in predictor.models
    queue = full.as_queue("train").head(100)
    pairs = queue.select("query_id").join(pl.DataFrame({"model": [newbie, "synth-00"]}), how="cross")
    predicted = predictor.predict(queue, pairs, None)
    mean = dict(predicted.group_by("model").agg(pl.col("p_correct").mean()).iter_rows())
    assert mean[newbie] > mean["synth-00"] + 0.15  # its own record, not its price neighbour's
    cost = dict(predicted.group_by("model").agg(pl.col("cost_usd").mean()).iter_rows())
    assert cost[newbie] == pytest.approx(cost["synth-00"], rel=0.25)  # priced from the run's models.csv
    # without the run it would be only a name: the bundled predictor has no estimate of its own for it
    plain = tmp_path / "plain"
    _invoke(["train", "--history", history_dir, "--out", str(plain), "--no-templates"])
    assert newbie not in load_predictor(Storage(), str(plain)).models


def test_read_label_file_reads_parquet_jsonl_and_csv(tmp_path: Path) -> None:
    frame = pl.DataFrame({"query_id": ["a", "b"], "gold": ["A", "B"]})
    frame.write_parquet(tmp_path / "l.parquet")
    frame.write_ndjson(tmp_path / "l.jsonl")
    frame.write_csv(tmp_path / "l.csv")
    for name in ("l.parquet", "l.jsonl", "l.csv"):
        got = read_label_file(Storage(), str(tmp_path / name))
        assert got.select("query_id", "gold").equals(frame)
    (tmp_path / "bad.jsonl").write_text('{"query_id": "a", "gold": "A"}\n{oops\n')
    with pytest.raises(Exception, match="row 2: not a JSON object"):
        read_label_file(Storage(), str(tmp_path / "bad.jsonl"))


def test_a_rerun_keeps_audit_silver_and_labels_and_silver_is_no_label(
    setup: dict[str, str], server: ReplayServer, live_run: Path, history: History, tmp_path: Path
) -> None:
    outcomes = pl.read_parquet(live_run / "outcomes.parquet")
    audited = outcomes.filter(pl.col("status") == "ok")["query_id"].unique().sort().head(10).to_list()
    # an audit's verdicts (h15b's --audit-share writes them): silver, for ten queries
    outcomes.with_columns(
        pl.when(pl.col("query_id").is_in(audited)).then(pl.lit(True)).otherwise(pl.col("correct")).alias("correct"),
        pl.when(pl.col("query_id").is_in(audited)).then(pl.lit(SILVER)).otherwise(None).alias("label_source"),
    ).write_parquet(live_run / "outcomes.parquet")
    labelled = pl.read_parquet(live_run / "results.parquet")["query_id"].sort().tail(5).to_list()
    _gold(history, labelled).write_csv(tmp_path / "labels.csv")
    _invoke(["label", str(live_run), str(tmp_path / "labels.csv")])
    report = json.loads((live_run / "report.json").read_text())
    assert report["accuracy_known_for"] == 5  # the silver verdicts are no labels: not in the measured accuracy
    _live_run(setup, server, live_run)  # the same command again: resumes, pays nothing, rebuilds the outcomes
    again = pl.read_parquet(live_run / "outcomes.parquet")
    assert set(again.filter(pl.col("label_source") == SILVER)["query_id"]) == set(audited) - set(labelled)
    assert set(again.filter(pl.col("label_source") == "gold")["query_id"]) == set(labelled)
    rerun = json.loads((live_run / "report.json").read_text())
    assert rerun["accuracy_known_for"] == 5
    assert rerun["accuracy"] == report["accuracy"]


def test_the_dags_join_labels_dropped_under_labels_run(live_run: Path, history: History, tmp_path: Path) -> None:
    import shutil

    from batchplan.core.layout import Layout
    from batchplan.dag_tasks.stages import labels_stage

    storage, lay, run = Storage(), Layout(str(tmp_path / "bucket")), "nightly-2026-11-30"
    for name in ("outcomes.parquet", "queries.parquet", "models.csv"):  # a DAG run's files, where it keeps them
        Path(lay.outcomes(run)).mkdir(parents=True, exist_ok=True)
        shutil.copy(live_run / name, Path(lay.outcomes(run)) / name)
    Path(lay.results_file(run)).parent.mkdir(parents=True)
    shutil.copy(live_run / "results.parquet", lay.results_file(run))
    Path(lay.reports(run)).mkdir(parents=True)
    shutil.copy(live_run / "report.json", Path(lay.reports(run)) / "report.json")
    ids = pl.read_parquet(live_run / "results.parquet")["query_id"].sort().head(8).to_list()
    Path(lay.labels(run)).mkdir(parents=True)
    _gold(history, ids).write_csv(Path(lay.labels(run)) / "week-48.csv")
    (Path(lay.labels(run)) / "broken.csv").write_text("query_id,label\nq,A\n")
    joined = labels_stage(storage, lay)
    by_file = {Path(j["file"]).name: j for j in joined}
    assert "missing column(s) gold" in by_file["broken.csv"]["error"]  # one line, and the rest go on
    assert "8 of 8 labels matched" in by_file["week-48.csv"]["summary"]
    report = json.loads((Path(lay.reports(run)) / "report.json").read_text())
    assert report["accuracy_known_for"] == 8
    assert report["accuracy_source"] == "labels"
    assert (Path(lay.reports(run)) / "report.html").exists()
    assert "Measured on labels" in (Path(lay.reports(run)) / "report.html").read_text()
    # the next report step finds the file joined: it is not read again
    assert [Path(j["file"]).name for j in labels_stage(storage, lay)] == ["broken.csv"]
