"""The DAGs on real Airflow 3 (``dag.test()``), against moto's S3 server on 127.0.0.1, the replay backend
and the bundled histories (``BATCHPLAN_DATA_DIR``, default ``../shared/data``).

A session fixture gives Airflow its own ``AIRFLOW_HOME`` (``airflow db migrate``, no examples, dags folder =
this repo's ``dags/``) and the connection ``batchplan_s3`` from ``AIRFLOW_CONN_BATCHPLAN_S3``, one bucket.

Each test has a prefix of its own in that bucket (``airflow_env``: ``BATCHPLAN_PREFIX`` for the DAG tasks),
so any one runs alone and in any order. What a test stands on is built once per session in prefixes of
its own and copied into the test's: ``seeded`` (the day queues and a first predictor promoted by the
retrain DAG), ``nightly_done`` and ``backfill_done`` (those runs completed on a copy of ``seeded``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchplan.app import artifacts
from batchplan.core.contracts import LIVE_OUTCOME_SCHEMA, ContractError
from batchplan.core.history import History
from batchplan.core.layout import Layout
from batchplan.core.storage import Storage
from batchplan.dag_tasks import common, stages

DAGS = Path(__file__).resolve().parent.parent / "dags"
NIGHTLY_DAY = "2026-03-02"
BACKFILL_DAYS = ("2026-02-20", "2026-02-21", "2026-02-22")
NIGHTLY_QUERIES = 450
ROUNDS_DAY = "2026-03-03"  # the nightly in rounds
ROUNDS_QUERIES = 450
BACKFILL_QUERIES_PER_DAY = 150

pytestmark = [
    # Airflow's .airflowignore reader uses pathspec's deprecated "gitwildmatch" (warned from typing_extensions).
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    # svcs (Airflow's in-process execution API) imports starlette's TestClient, which warns about httpx.
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated"),
]


@dataclass
class AirflowEnv:
    home: Path
    bucket: str
    layout: Layout
    storage: Storage
    timings: dict[str, float]


@pytest.fixture(scope="session")
def airflow_session(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[AirflowEnv]:
    """A fresh AIRFLOW_HOME with a migrated database, and a bucket on moto's server for the DAGs."""
    import boto3

    if "airflow" in sys.modules and not os.environ.get("AIRFLOW_HOME", "").startswith(
        str(tmp_path_factory.getbasetemp())
    ):
        pytest.fail("airflow was imported before this fixture: its configuration would not be the test's")
    home = tmp_path_factory.mktemp("airflow_home")
    bucket = f"batchplan-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(DAGS / "plugins"),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_CONN_BATCHPLAN_S3": json.dumps(connection),
        "BATCHPLAN_BUCKET": bucket,
        "BATCHPLAN_PREFIX": "bp",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("BATCHPLAN_ROOT", raising=False)
        airflow_bin = Path(sys.executable).parent / "airflow"
        migrate = subprocess.run(
            [str(airflow_bin), "db", "migrate"],
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr[-2000:]
        yield AirflowEnv(
            home=home,
            bucket=bucket,
            layout=Layout.for_bucket(bucket, "bp"),
            storage=Storage(s3_endpoint_url=s3_endpoint, s3_region="us-east-1"),
            timings={},
        )


def _copy_prefix(source: AirflowEnv, target: AirflowEnv) -> None:
    """Every object under ``source``'s prefix, at the same key under ``target``'s."""
    storage, root = source.storage, source.layout.root + "/"
    for uri in storage.list(root):
        storage.write_bytes(target.layout.root + "/" + uri.removeprefix(root), storage.read_bytes(uri))


@contextmanager
def _in_prefix(session: AirflowEnv, prefix: str, copy_of: AirflowEnv | None = None) -> Iterator[AirflowEnv]:
    """``session`` under its own ``prefix`` of the bucket (what the DAG tasks see as ``BATCHPLAN_PREFIX``),
    starting as a copy of ``copy_of``'s prefix if given."""
    env = replace(session, layout=Layout.for_bucket(session.bucket, prefix))
    if copy_of is not None:
        _copy_prefix(copy_of, env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BATCHPLAN_PREFIX", prefix)
        yield env


@pytest.fixture
def airflow_env(airflow_session: AirflowEnv) -> Iterator[AirflowEnv]:
    """This test's own, empty prefix of the bucket."""
    with _in_prefix(airflow_session, f"bp-{uuid.uuid4().hex[:8]}") as env:
        yield env


@pytest.fixture(scope="session")
def dagbag(airflow_session: AirflowEnv) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="session")
def queue_days(real_history: History) -> dict[str, pl.DataFrame]:
    """The queue of each day: one day for the nightly, three for the backfill, disjoint queries."""
    queue = real_history.as_queue("test").sample(fraction=1.0, shuffle=True, seed=7)
    days: dict[str, pl.DataFrame] = {NIGHTLY_DAY: queue.head(NIGHTLY_QUERIES)}
    days[ROUNDS_DAY] = queue.slice(NIGHTLY_QUERIES, ROUNDS_QUERIES)
    offset = NIGHTLY_QUERIES + ROUNDS_QUERIES
    for the_day in BACKFILL_DAYS:
        days[the_day] = queue.slice(offset, BACKFILL_QUERIES_PER_DAY)
        offset += BACKFILL_QUERIES_PER_DAY
    return days


def _write_queues(env: AirflowEnv, days: dict[str, pl.DataFrame]) -> None:
    """Queue parts in the prefix (parquet and jsonl), and one malformed row for the quarantine."""
    lay, storage = env.layout, env.storage
    for the_day, frame in days.items():
        half = frame.height // 2
        storage.write_frame(frame.head(half), f"{lay.queue(the_day)}part-0.parquet")
        storage.write_frame(frame.tail(frame.height - half), f"{lay.queue(the_day)}part-1.jsonl")
    storage.write_bytes(f"{lay.queue(NIGHTLY_DAY)}part-2.jsonl", b'{"query_id": "bad-1", "prompt": ""}\n')


@dataclass(frozen=True)
class Done:
    """A DAG run completed in a prefix of its own (copy it into a test's prefix before changing anything)."""

    env: AirflowEnv
    dag_run: Any
    conf: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def seeded(airflow_session: AirflowEnv, dagbag: Any, queue_days: dict[str, pl.DataFrame]) -> Done:
    """The day queues and a first predictor, promoted by the retrain DAG."""
    with _in_prefix(airflow_session, "seeded") as env:
        _write_queues(env, queue_days)
        dag_run = _retrain(dagbag, env, "retrain (first)", datetime(2026, 3, 1, tzinfo=UTC))
    return Done(env, dag_run)  # BATCHPLAN_PREFIX is the session's again: a test sets its own


@pytest.fixture(scope="session")
def nightly_done(airflow_session: AirflowEnv, dagbag: Any, seeded: Done, queue_days: dict[str, pl.DataFrame]) -> Done:
    """The nightly run of NIGHTLY_DAY on a copy of ``seeded``: one budget, the busiest tenant (tenant = data
    set) capped."""
    capped = queue_days[NIGHTLY_DAY]["tenant"].mode()[0]
    # single shot (rounds 1): these runs test the sharded dispatch and its resume
    conf = {"budget_usd": 0.05, "max_shards": 4, "allow_deferral": True, "tenant_budgets_usd": {capped: 0.004}, "rounds": 1}
    with _in_prefix(airflow_session, "nightly-done", copy_of=seeded.env) as env:
        dag_run = _nightly(dagbag, env, "nightly", datetime(2026, 3, 2, 2, tzinfo=UTC), conf)
    return Done(env, dag_run, conf)


@pytest.fixture(scope="session")
def backfill_done(airflow_session: AirflowEnv, dagbag: Any, seeded: Done) -> Done:
    """The backfill of BACKFILL_DAYS (and an empty 23rd) under one budget, on a copy of ``seeded``."""
    conf = {"start_date": BACKFILL_DAYS[0], "end_date": "2026-02-23", "budget_usd": 0.04, "rounds": 1}
    with _in_prefix(airflow_session, "backfill-done", copy_of=seeded.env) as env:
        dag_run = _run(
            dagbag, env, "batchplan_backfill", "backfill", logical_date=datetime(2026, 3, 3, tzinfo=UTC), run_conf=conf
        )
    return Done(env, dag_run, conf)


@pytest.fixture
def copy_of(airflow_env: AirflowEnv) -> Callable[[Done], AirflowEnv]:
    """``copy_of(done)``: ``done``'s prefix copied into this test's (``airflow_env``), to change freely."""

    def copy(done: Done) -> AirflowEnv:
        _copy_prefix(done.env, airflow_env)
        return airflow_env

    return copy


@contextmanager
def _params_restored(dag: Any) -> Iterator[None]:
    """The DAG's and its tasks' param defaults as they were, after a run. dag.test() runs the tasks in this
    process, and Airflow's process_params resolves each run's conf through the task's own Param objects,
    which keep the value they resolved (Param.resolve): without this, every key a later run's conf omits
    would default to an earlier run's value (the nightly test's tenant cap, the rounds test's rounds=2).
    A scheduler parses the DAG afresh for every task, so production runs never see this."""
    params = [param for holder in (dag, *dag.tasks) for param in holder.params.values()]
    saved = [deepcopy(param.value) for param in params]
    try:
        yield
    finally:
        for param, value in zip(params, saved, strict=True):
            param.value = value


def _run(dagbag: Any, airflow_env: AirflowEnv, dag_id: str, label: str, **kwargs: Any) -> Any:
    dag = dagbag.get_dag(dag_id)
    assert dag is not None, dagbag.import_errors
    for task in dag.tasks:  # a failure should fail the test now, not after the production retry delays
        task.retries = 0
    # dag.test() names the run after run_after (default: now): the same run_after is the same DAG run.
    kwargs.setdefault("run_after", kwargs.get("logical_date"))
    started = time.perf_counter()
    with _params_restored(dag):
        dag_run = dag.test(**kwargs)
    airflow_env.timings[label] = time.perf_counter() - started
    print(f"dag.test {label}: {airflow_env.timings[label]:.1f} s")
    return dag_run


def _nightly(dagbag: Any, env: AirflowEnv, label: str, logical_date: datetime, conf: dict[str, Any]) -> Any:
    return _run(dagbag, env, "batchplan_nightly", label, logical_date=logical_date, run_conf=conf)


def _retrain(dagbag: Any, env: AirflowEnv, label: str, logical_date: datetime, *, round_choice: bool = True) -> Any:
    """The retrain DAG with "prior", the cheap baseline predictor (the DAG's default, LightGBM, trains for ~1 min
    on this machine). Without ``round_choice`` (the DAG's param) its training skips the per_task planner's replay
    (~240 s of a ~370 s training here): the first retrain (``seeded``) fits and checks it; the later ones test what
    the DAG decides on new outcomes and labels, which nothing of the replay feeds."""
    conf = {"predictor": "prior", "round_choice": round_choice}
    return _run(dagbag, env, "batchplan_retrain", label, logical_date=logical_date, run_conf=conf)


def _states(dag_run: Any) -> dict[str, str]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return {
            f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state)
            for ti in dag_run.get_task_instances(session=session)
        }


def _succeeded(dag_run: Any) -> dict[str, str]:
    """The run's task states, once it is asserted to have succeeded (the states are the failure's message)."""
    states = _states(dag_run)
    assert str(dag_run.state) == "success", states
    return states


def _paid_calls(storage: Storage, results_uri: str) -> int:
    """Call events in every ledger under a run's results: what was sent and paid for."""
    count = 0
    for uri in storage.list(results_uri):
        if "/ledger/" in uri and uri.endswith(".jsonl"):
            count += sum(
                1 for line in storage.read_text(uri).splitlines() if line.strip() and json.loads(line).get("e") == "c"
            )
    return count


# ------------------------------------------------------------------------------------------------- parse
def test_dagbag_imports_without_errors_or_parse_time_io(
    airflow_env: AirflowEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Variable

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"connection or Variable read at parse time: {args}")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(forbidden))
    monkeypatch.setattr(Variable, "get", staticmethod(forbidden))
    monkeypatch.setattr(common, "storage_from_connection", forbidden)
    started = time.perf_counter()
    bag = DagBag(dag_folder=str(DAGS))
    parse_seconds = time.perf_counter() - started
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"batchplan_nightly", "batchplan_backfill", "batchplan_retrain"}
    assert parse_seconds < 30
    for dag in bag.dags.values():
        assert dag.doc_md
        assert "batchplan" in dag.tags
        assert dag.default_args.get("retries", 0) >= 1
        # the nightly runs beside itself (see test_nightly_triggers_with_its_defaults); the others one at a time
        assert dag.max_active_runs == 1 or dag.dag_id == "batchplan_nightly"


def test_the_dags_batch_api_param_runs_in_rounds_and_needs_a_batch_backend(airflow_session: AirflowEnv) -> None:
    # params() imports airflow: after the session fixture set its home (test_batch_cli.py ran it before)
    from batchplan.core.errors import ContractError
    from batchplan.dag_tasks.common import RunParams
    from batchplan.dag_tasks.rounds import in_rounds, params

    assert params()["batch_api"].value is False
    base = {"budget_usd": 1.0, "backend": "openai", "rounds": 1}
    assert RunParams.from_params(base).in_rounds is False
    assert params()["rounds"].value == 3  # the default: 3 rounds of the plan (README, Rounds)
    assert RunParams.from_params({"budget_usd": 1.0}).rounds == 3
    assert RunParams.from_params({**base, "batch_api": True}).in_rounds  # in rounds even with rounds = 1
    assert in_rounds({**base, "batch_api": True})
    with pytest.raises(ContractError, match="batch_api needs a backend with a batch API"):
        RunParams.from_params({**base, "backend": "replay", "batch_api": True})


def test_dag_shapes(dagbag: Any) -> None:
    nightly = dagbag.get_dag("batchplan_nightly")
    assert {"budget_usd", "accuracy_target", "allow_deferral", "queue_date", "queue_prefix"} <= set(nightly.params)
    sensor = nightly.get_task("wait_for_queue")
    assert sensor.mode == "reschedule" or getattr(sensor, "deferrable", False)
    dispatch = nightly.get_task("dispatch")
    assert dispatch.max_active_tis_per_dagrun is not None
    assert {a.name for a in nightly.get_task("merge").outlets} == {"batchplan_results", "batchplan_outcomes"}
    assert {a.name for a in nightly.get_task("drift").outlets} == {"batchplan_drift"}  # only when drift is found
    assert "audit_share" in nightly.params
    assert nightly.params["max_shards"] <= common.MAX_SHARDS
    backfill = dagbag.get_dag("batchplan_backfill")
    assert {"start_date", "end_date", "budget_usd"} <= set(backfill.params)
    assert backfill.get_task("dispatch_day").max_active_tis_per_dagrun == 1
    retrain = dagbag.get_dag("batchplan_retrain")
    assert retrain.timetable.asset_condition is not None


def test_nightly_triggers_with_its_defaults(dagbag: Any) -> None:
    """Airflow's trigger form counts a param whose type does not admit null as required, and does not trigger
    while a required field is empty: every param left empty by default must be optional. And a run triggered
    by hand must not queue behind the scheduled run that unpausing creates, waiting for a queue not there."""
    for dag in dagbag.dags.values():
        for name in dag.params:
            param = dag.params.get_param(name)
            types = param.schema.get("type", [])
            types = types if isinstance(types, list) else [types]
            if param.value in (None, ""):
                assert "null" in types, f"{dag.dag_id}: param {name} is required but empty by default"
        dag.params.validate()  # the defaults as they are trigger a run
    nightly = dagbag.get_dag("batchplan_nightly")
    resolved = nightly.params.validate()
    assert resolved["queue_date"] is None
    assert common.queue_day(resolved, datetime(2026, 3, 2, 2, tzinfo=UTC)) == "2026-03-02"  # the logical date
    lay = Layout.for_bucket("b", "bp")
    assert common.queue_uri(lay, resolved, "2026-03-02") == lay.queue("2026-03-02")
    assert nightly.max_active_runs > 1  # a manual run beside a scheduled one still waiting for its queue
    assert nightly.catchup is False  # unpausing creates one scheduled run, not one per missed night
    sensor = nightly.get_task("wait_for_queue")
    assert sensor.mode == "reschedule"  # waiting holds no worker slot
    assert sensor.soft_fail is True  # no queue by the deadline: skipped, not failed
    assert sensor.timeout <= 12 * 3600


def test_a_dag_test_run_leaves_no_conf_behind_for_the_next(dagbag: Any) -> None:
    """What makes the DAG tests independent of their order: a run's conf resolved in this process (as
    dag.test() does for each task) is not the next run's default for the keys the next conf omits."""
    from airflow.sdk.definitions.param import process_params

    from batchplan.core.request import DEFAULT_RUN_ROUNDS

    nightly = dagbag.get_dag("batchplan_nightly")
    plan = nightly.get_task("plan")

    def resolved(conf: dict[str, Any]) -> dict[str, Any]:
        return process_params(nightly, plan, conf, suppress_exception=False)

    capped = {"budget_usd": 0.05, "tenant_budgets_usd": {"routerbench": 0.004}, "rounds": 2}
    with _params_restored(nightly):  # the outer one: this test leaves nothing behind for the DAG runs either
        with _params_restored(nightly):
            assert resolved(capped)["tenant_budgets_usd"] == {"routerbench": 0.004}
            # the leak itself, inside one run's lifetime: Airflow keeps the resolved value in the task's Param
            assert resolved({"budget_usd": 0.5})["tenant_budgets_usd"] == {"routerbench": 0.004}
        after = resolved({"budget_usd": 0.5, "audit_share": 0.1})
        assert after["tenant_budgets_usd"] == {}
        assert after["rounds"] == DEFAULT_RUN_ROUNDS  # the DAG's own default, not the 2 an earlier conf set


def test_budget_shares_never_exceed_the_budget() -> None:
    for budget in (0.0, 1e-9, 0.3, 1.0, 7.123456789, 1e6):
        for weights in ([1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1e-12, 5.0], [0.1] * 32):
            shares = stages.budget_shares(weights, budget)
            assert sum(s for s in shares if s is not None) <= budget
            assert all(s is not None and s >= 0 for s in shares)
    assert stages.budget_shares([1.0, 1.0], None) == [None, None]
    assert stages.shard_count(10_000_000) == common.MAX_SHARDS
    assert stages.shard_count(10) == 1


def test_tenant_budget_params_are_validated() -> None:
    params = common.RunParams.from_params({"budget_usd": 1.0, "tenant_budgets_usd": {"acme": "0.5"}})
    assert params.request().tenant_budgets_usd == {"acme": 0.5}
    assert common.RunParams.from_params({"budget_usd": 1.0}).tenant_budgets_usd == {}
    assert common.RunParams.from_params({"budget_usd": 1.0}).request().allow_unused_constraints is False
    opted = common.RunParams.from_params({"budget_usd": 1.0, "allow_unused_constraints": True})
    assert opted.request().allow_unused_constraints is True
    for bad, message in (([1], "must be an object"), ({"acme": "lots"}, "acme"), ({"acme": -1}, ">= 0")):
        with pytest.raises(ContractError, match=message):
            common.RunParams.from_params({"budget_usd": 1.0, "tenant_budgets_usd": bad})


def test_explore_share_is_a_param_of_both_run_dags(dagbag: Any) -> None:
    """explore_share (empty by default: automatic, on while the labels show drift, as the CLI's run decides it in
    ``plans.planning.choose_exploration``) reaches the run's request; 0 given stays 0; out of [0, 1) is refused."""
    for dag_id in ("batchplan_nightly", "batchplan_backfill"):
        dag = dagbag.get_dag(dag_id)
        assert {"audit_share", "explore_share"} <= set(dag.params)
        assert dag.params.validate()["explore_share"] is None
    assert common.RunParams.from_params({"budget_usd": 1.0}).request().explore_share is None
    assert common.RunParams.from_params({"budget_usd": 1.0, "explore_share": ""}).explore_share is None
    assert common.RunParams.from_params({"budget_usd": 1.0, "explore_share": 0}).request().explore_share == 0.0
    asked = common.RunParams.from_params({"budget_usd": 1.0, "audit_share": 0.1, "explore_share": 0.05})
    assert asked.request().explore_share == 0.05
    for bad in (1.0, -0.1, "lots"):
        with pytest.raises(ContractError, match="explore_share"):
            common.RunParams.from_params({"budget_usd": 1.0, "explore_share": bad})


# --------------------------------------------------------------------------------------------- the runs
@pytest.mark.slow
def test_retrain_bootstraps_the_first_predictor(seeded: Done) -> None:
    _succeeded(seeded.dag_run)
    lay, storage = seeded.env.layout, seeded.env.storage
    current = json.loads(storage.read_text(lay.current_predictor()))
    decision = json.loads(storage.read_text(lay.decision(current["version"])))
    assert decision["promoted"] is True
    assert decision["current"] is None
    assert decision["source"] == "holdout"  # no live run yet: the bundled holdout judges
    # the per_task planner's choice, replayed on the training history, is saved with the version
    choice = artifacts.load_round_choice(storage, lay.predictors(), current["version"])
    assert choice is not None
    assert choice.gains
    assert all(len(gains) == len(choice.levels) for gains in choice.gains.values())


@pytest.mark.slow
def test_nightly_runs_the_queue_under_one_budget(nightly_done: Done, queue_days: dict[str, pl.DataFrame]) -> None:
    dag_run, budget = nightly_done.dag_run, nightly_done.conf["budget_usd"]
    [(capped, cap)] = nightly_done.conf["tenant_budgets_usd"].items()
    states = _succeeded(dag_run)
    mapped = [k for k in states if k.startswith("dispatch[")]
    assert 1 < len(mapped) <= 4
    lay, storage, run = nightly_done.env.layout, nightly_done.env.storage, f"nightly-{NIGHTLY_DAY}"
    manifest = json.loads(storage.read_text(lay.results_manifest(run)))
    assert manifest["queries"] == queue_days[NIGHTLY_DAY].height
    assert manifest["spent_usd"] <= budget
    assert manifest["within_budget"] is True
    shards = json.loads(storage.read_text(lay.shards_manifest(run)))["shards"]
    assert sum(s["budget_usd"] for s in shards) <= budget
    assert sum(s["tenant_budgets_usd"][capped] for s in shards) <= cap
    assert 0 < manifest["tenant_spent_usd"][capped] <= cap
    results = storage.read_frame(lay.results_file(run))
    assert results["query_id"].n_unique() == queue_days[NIGHTLY_DAY].height
    quarantine = storage.read_frame(f"{lay.quarantine(run)}quarantine.parquet")
    assert quarantine["query_id"].to_list() == ["bad-1"]
    html = storage.read_text(lay.report_html(run))
    assert "batchplan report" in html
    # the frontier planned beside the plan, per-model spend from the shards' ledgers: all three charts drawn
    assert json.loads(storage.read_text(lay.plan_file(run, "plan.frontier.json")))
    assert html.count("<svg") == 3
    report = json.loads(storage.read_text(f"{lay.reports(run)}/report.json"))
    assert sum(m["spent_usd"] for m in report["spend_per_model"]) == pytest.approx(manifest["spent_usd"])
    assert stages.report_html_for(storage, lay, "batchplan_nightly", dag_run.run_id) == html
    assert storage.list(lay.outcomes(run))
    assert _paid_calls(storage, lay.results(run)) > 0
    # one outcome per call of every shard, scored by the replay history (the backend's truth), label_source gold
    outcomes = storage.read_frame(f"{lay.outcomes(run)}/outcomes.parquet")
    assert outcomes.schema == LIVE_OUTCOME_SCHEMA
    assert outcomes.height == _paid_calls(storage, lay.results(run))
    assert (outcomes.filter(pl.col("correct").is_not_null())["label_source"] == "gold").all()


@pytest.mark.slow
def test_nightly_rerun_neither_dispatches_nor_pays_twice(
    dagbag: Any, nightly_done: Done, copy_of: Callable[[Done], AirflowEnv], queue_days: dict[str, pl.DataFrame]
) -> None:
    env = copy_of(nightly_done)
    lay, storage, run = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}"
    before_calls = _paid_calls(storage, lay.results(run))
    before = json.loads(storage.read_text(lay.results_manifest(run)))
    # Drop the shard outputs so the dispatch tasks really run again: only the ledger stands between a
    # re-run and paying twice.
    for uri in storage.list(lay.results(run)):
        if uri.rsplit("/", 1)[-1] == "results.parquet" and "/shard-" in uri:
            storage.delete(uri)
    capped = queue_days[NIGHTLY_DAY]["tenant"].mode()[0]
    # the same request as the first run: one asking another is refused (see the next test)
    # single shot (rounds 1): these runs test the sharded dispatch and its resume
    conf = {"budget_usd": 0.05, "max_shards": 4, "allow_deferral": True, "tenant_budgets_usd": {capped: 0.004}, "rounds": 1}
    states = _succeeded(_nightly(dagbag, env, "nightly (re-run)", datetime(2026, 3, 2, 2, tzinfo=UTC), conf))
    # every task succeeded; the drift task is skipped when the audits found no drift (it emits the Asset only then)
    assert all(state == "success" or (task, state) == ("drift", "skipped") for task, state in states.items()), states
    after = json.loads(storage.read_text(lay.results_manifest(run)))
    rewritten = [u for u in storage.list(lay.results(run)) if "/shard-" in u and u.endswith("/results.parquet")]
    assert len(rewritten) == before["shards"], "every shard dispatched again"
    assert _paid_calls(storage, lay.results(run)) == before_calls
    assert after["spent_usd"] == pytest.approx(before["spent_usd"])
    assert after["status"] == before["status"]


@pytest.mark.slow
def test_plan_refuses_what_it_cannot_enforce(
    nightly_done: Done, copy_of: Callable[[Done], AirflowEnv], queue_days: dict[str, pl.DataFrame]
) -> None:
    """The plan task, where the params first meet the queue: a tenant budget naming no queued tenant fails
    the run with the queued tenants named (unless opted in, then the report lists it), and a run re-run
    with another budget is refused instead of reporting a budget its stored shards do not enforce."""
    env = copy_of(nightly_done)  # the nightly run's stored plan, in this test's own prefix
    lay, storage, run = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}"
    tenants = sorted(queue_days[NIGHTLY_DAY]["tenant"].unique().to_list())
    with pytest.raises(ContractError, match=r"was planned for another request \(budget_usd: 0.05 -> 0.07"):
        stages.plan_stage(storage, lay, run, common.RunParams.from_params({"budget_usd": 0.07, "max_shards": 4}))
    typo = "typo-" + NIGHTLY_DAY
    for name in ("queue.parquet", "predictions.parquet"):  # the nightly run's ingest and predict outputs
        storage.write_bytes(lay.plan_file(typo, name), storage.read_bytes(lay.plan_file(run, name)))
    params = {"budget_usd": 0.05, "tenant_budgets_usd": {tenants[0] + "x": 0.01}}
    with pytest.raises(ContractError) as raised:
        stages.plan_stage(storage, lay, typo, common.RunParams.from_params(params))
    assert f"tenant '{tenants[0]}x' is not in this batch (tenants, closest first: '{tenants[0]}'" in str(raised.value)
    assert not storage.exists(lay.shards_manifest(typo))
    stages.plan_stage(storage, lay, typo, common.RunParams.from_params(params | {"allow_unused_constraints": True}))
    manifest = json.loads(storage.read_text(lay.shards_manifest(typo)))
    assert manifest["optimizer"]["unused_constraints"] == [
        f"tenant budget: tenant '{tenants[0]}x' is not in this batch"
    ]


@pytest.mark.slow
def test_plan_explores_the_drifted_task_when_the_live_labels_show_drift(
    nightly_done: Done, copy_of: Callable[[Done], AirflowEnv]
) -> None:
    """explore_share unset: the plan task reads the live correction the predictions used (``live_offsets``)
    and decides as the CLI's run: labels putting an LLM off on one task turn exploration on, on that task's
    queries only, and the shards manifest records why (the report stage reads it there)."""
    from batchplan.core.contracts import audited_query_id, is_exploration
    from tests.support.factories import drifted_live

    env = copy_of(nightly_done)
    lay, storage, source = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}"
    run = "drifted-" + NIGHTLY_DAY
    for name in ("queue.parquet", "predictions.parquet"):  # the nightly run's ingest and predict outputs
        storage.write_bytes(lay.plan_file(run, name), storage.read_bytes(lay.plan_file(source, name)))
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet"))
    tasks = dict(queue.select("query_id", "task").iter_rows())
    task = sorted(set(tasks.values()))[0]
    assert len(set(tasks.values())) > 1
    llm = str(storage.read_frame(lay.plan_file(run, "predictions.parquet"))["model"][0])
    storage.write_frame(drifted_live(task, llm).offsets, lay.plan_file(run, stages.LIVE_OFFSETS_FILE))
    stages.plan_stage(storage, lay, run, common.RunParams.from_params({"budget_usd": 0.05, "max_shards": 2}))
    manifest = json.loads(storage.read_text(lay.shards_manifest(run)))
    assert manifest["exploration"]["source"] == "drift"
    assert manifest["exploration"]["tasks"] == [task]
    assert manifest["request"]["explore_share"] == manifest["exploration"]["share"]
    explored = storage.read_frame(lay.plan_file(run, stages.AUDIT_PLAN_FILE)).filter(is_exploration())
    assert explored.height > 0
    assert {tasks[audited_query_id(q)] for q in explored["query_id"]} == {task}


@pytest.mark.slow
def test_second_run_racing_for_the_same_queue_is_skipped(
    dagbag: Any, nightly_done: Done, copy_of: Callable[[Done], AirflowEnv]
) -> None:
    env = copy_of(nightly_done)
    lay, storage, run = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}"
    before_calls = _paid_calls(storage, lay.results(run))
    conf = {"budget_usd": 0.05, "queue_date": NIGHTLY_DAY}
    states = _states(_nightly(dagbag, env, "nightly (racing run)", datetime(2026, 3, 2, 3, tzinfo=UTC), conf))
    assert states["ingest"] == "skipped"
    assert states["report"] == "skipped"
    assert _paid_calls(storage, lay.results(run)) == before_calls
    claim = json.loads(storage.read_text(lay.claim(NIGHTLY_DAY)))
    assert claim["owner"].startswith("batchplan_nightly/")
    assert claim["owner"] == "batchplan_nightly/manual__2026-03-02T02:00:00+00:00", "the first run keeps the claim"


@pytest.mark.slow
def test_nightly_in_rounds_replans_the_whole_batch_under_what_is_left(
    dagbag: Any, seeded: Done, copy_of: Callable[[Done], AirflowEnv], queue_days: dict[str, pl.DataFrame]
) -> None:
    """rounds=2: round 1 and round 2 each planned once over every shard, dispatched in shards with budget
    shares of what is left; rounds 3-4 and the single-shot dispatch do nothing; one budget holds."""
    budget = 0.03
    env = copy_of(seeded)
    conf = {"budget_usd": budget, "max_shards": 2, "allow_deferral": True, "queue_date": ROUNDS_DAY, "rounds": 2}
    states = _succeeded(_nightly(dagbag, env, "nightly (rounds=2)", datetime(2026, 3, 3, 2, tzinfo=UTC), conf))
    lay, storage, run = env.layout, env.storage, f"nightly-{ROUNDS_DAY}"
    # round 1's calls, dispatched in as many shards as their number allows (at most max_shards)
    calls_1 = storage.read_frame(f"{lay.results(run)}rounds/1/calls.parquet").filter(pl.col("models").list.len() > 0)
    round_1 = [k for k in states if k.startswith("round_1_dispatch[")]
    assert calls_1.height > 0
    assert len(round_1) == stages.shard_count(calls_1.height, 2), states
    manifest = json.loads(storage.read_text(lay.results_manifest(run)))
    assert manifest["queries"] == queue_days[ROUNDS_DAY].height
    assert manifest["spent_usd"] <= budget
    rounds_dir = f"{lay.results(run)}rounds"
    observed = [storage.read_frame(f"{rounds_dir}/{k}/observations.parquet") for k in (1, 2)]
    assert observed[0].height > 0
    assert not storage.exists(f"{rounds_dir}/3/calls.parquet")  # past the param: nothing planned
    # round 2's hard budget is the total minus what round 1 charged, over all shards
    plan_2 = json.loads(storage.read_text(f"{rounds_dir}/2/plan.json"))
    assert plan_2["budget_left_usd"] == pytest.approx(budget - float(observed[0]["cost_usd"].sum()))
    # the single-shot dispatch stood aside: every paid call is in a round's ledger
    assert _paid_calls(storage, lay.results(run)) == _paid_calls(storage, rounds_dir)
    assert _paid_calls(storage, rounds_dir) == sum(o.height for o in observed)
    report = json.loads(storage.read_text(f"{lay.reports(run)}/report.json"))
    assert 0 < report["estimated_accuracy"] <= 1
    assert "estimated after the run" in storage.read_text(lay.report_html(run))
    # the report reads the rounds' ledgers: spend per LLM sums to the spend, one line per round
    assert sum(m["spent_usd"] for m in report["spend_per_model"]) == pytest.approx(manifest["spent_usd"])
    assert [r["round"] for r in report["rounds"]] == [1, 2]


BATCH_DAY = "2026-03-06"  # the nightly by the OpenAI Batch API: the cascades test split, its own queue


def _nightly_by_batch(
    dagbag: Any, env: AirflowEnv, conf: dict[str, Any], logical_date: datetime, queue: pl.DataFrame
) -> dict[str, Any]:
    """The nightly by ``conf``'s backend's batch API (one round, deferral allowed, default audits), the
    settings read afresh; asserts it succeeded with one result per query within the budget; its manifest."""
    from batchplan.core.settings import get_settings

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("BATCHPLAN_BATCH_POLL_S", "0.02")
    get_settings.cache_clear()
    # every param an earlier run set is given: dag.test keeps an earlier run's conf in the DAG's params
    conf = {"allow_deferral": True, "batch_api": True, "rounds": 1, "tenant_budgets_usd": {}, "audit_share": None} | conf
    try:
        label = f"nightly ({conf['backend']} batch)"
        dag_run = _nightly(dagbag, env, label, logical_date, conf)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    _succeeded(dag_run)
    lay, run = env.layout, f"nightly-{conf['queue_date']}"
    manifest: dict[str, Any] = json.loads(env.storage.read_text(lay.results_manifest(run)))
    results = env.storage.read_frame(lay.results_file(run))
    assert manifest["queries"] == results.height == queue.height
    assert results["query_id"].n_unique() == queue.height  # one result per query
    assert manifest["spent_usd"] <= conf["budget_usd"]
    return manifest


@pytest.mark.slow
def test_nightly_by_the_batch_api_end_to_end(
    dagbag: Any,
    seeded: Done,
    copy_of: Callable[[Done], AirflowEnv],
    real_history: History,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """backend openai + batch_api: the endpoint and key from the ``batchplan_openai`` connection, the prices
    from the layout's ``prices/models.csv``; every call goes by the local Files + Batches server, one result
    per query, the spend within the budget, and the server's bill is the batch price (half the recorded
    cost) of exactly what the run says it spent. The key is in no log."""
    from batchplan.core.history import load_history
    from tests.support.batch_server import BatchFaults, BatchServer

    cascades = data_dir / "cascades"
    if not (cascades / "models.csv").exists():
        pytest.skip("needs the cascades history (../shared/data/cascades)")
    budget, key = 0.03, "sk-batchplan-test-key-not-in-logs"
    env = copy_of(seeded)
    lay, storage, run = env.layout, env.storage, f"nightly-{BATCH_DAY}"
    queue = real_history.as_queue("test").filter(pl.col("tenant") == "cascades")
    storage.write_frame(queue, f"{lay.queue(BATCH_DAY)}part-0.parquet")
    storage.write_bytes(lay.prices(), (cascades / "models.csv").read_bytes())
    history = load_history([str(cascades)])
    with BatchServer(history, BatchFaults(validate_s=0.0, run_s=0.05)) as server:
        connection = {"conn_type": "http", "host": server.base_url, "password": key}
        monkeypatch.setenv("AIRFLOW_CONN_BATCHPLAN_OPENAI", json.dumps(connection))
        conf = {"budget_usd": budget, "max_shards": 2, "queue_date": BATCH_DAY, "backend": "openai"}
        manifest = _nightly_by_batch(dagbag, env, conf, datetime(2026, 3, 6, 2, tzinfo=UTC), queue)
        stats = server.stats()
        billed_keys = dict(server.billed_keys)
    assert stats["batches"], "nothing went by batch"
    assert stats["authorized"] > 0  # the connection's key was sent
    assert stats["submitted_twice"] == []
    assert stats["billed_twice"] == []
    # every billed call came back in a batch's output (none went real time), billed as the run counted it
    assert stats["billed_calls"] == sum(b["request_counts"]["completed"] for b in stats["batches"]) > 0
    assert manifest["spent_usd"] == pytest.approx(stats["billed_usd"], rel=1e-9)
    recorded = dict(
        zip(
            zip(history.outcomes["query_id"].to_list(), history.outcomes["model"].to_list(), strict=True),
            history.outcomes["cost_usd"].to_list(),
            strict=True,
        )
    )
    # an audited query's plan call and reference call may ask the same LLM: each billed call counts
    on_demand = sum(recorded[k] * n for k, n in billed_keys.items())
    assert stats["billed_usd"] == pytest.approx(0.5 * on_demand, rel=1e-6)  # the batch price
    outcomes = storage.read_frame(f"{lay.outcomes(run)}/outcomes.parquet")
    assert float(outcomes["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    assert storage.exists(lay.report_html(run))
    captured = capfd.readouterr()
    assert key not in captured.out + captured.err


BEDROCK_DAY = "2026-03-07"  # the nightly by Bedrock batch inference: the cascades test split, its own queue


@pytest.mark.slow
def test_nightly_by_bedrock_batch_end_to_end(
    dagbag: Any,
    seeded: Done,
    copy_of: Callable[[Done], AirflowEnv],
    real_history: History,
    data_dir: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """backend bedrock + batch_api: the runtime, control-plane and S3 clients from the ``batchplan_bedrock``
    AWS connection (an endpoint per service), the job prefix and role from the settings; the jobs go by the
    local control plane over moto's S3 (an LLM below Bedrock's 100-record minimum by its Converse), one
    result per query, no job created twice, the spend within the budget and equal to the bill, and every
    billed call in the run's outcomes at what it was billed."""
    import boto3

    from batchplan.core.history import load_history
    from tests.support.bedrock_control_server import BedrockControlServer

    cascades = data_dir / "cascades"
    if not (cascades / "models.csv").exists():
        pytest.skip("needs the cascades history (../shared/data/cascades)")
    # cascades' test split (169 queries) under an account quota of 20 records a job (at the default 100 every
    # LLM's share of 169 is below it, and the calls rightly go in real time); tight (gpt-4o-mini on all costs
    # ~$0.0043 in real time, half by batch), so a cheap LLM goes by batch for most queries
    monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_MIN_RECORDS", "20")
    budget = 0.0035
    env = copy_of(seeded)
    lay, storage, run = env.layout, env.storage, f"nightly-{BEDROCK_DAY}"
    queue = real_history.as_queue("test").filter(pl.col("tenant") == "cascades")
    storage.write_frame(queue, f"{lay.queue(BEDROCK_DAY)}part-0.parquet")
    storage.write_bytes(lay.prices(), (cascades / "models.csv").read_bytes())
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with BedrockControlServer(load_history([str(cascades)]), s3, run_s=0.05) as control:
        extra = {"region_name": "us-east-1", "endpoint_url": control.endpoint_url,
                 "service_config": {"s3": {"endpoint_url": s3_endpoint}}}  # fmt: skip
        connection = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_BATCHPLAN_BEDROCK", json.dumps(connection))
        monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_URI", f"{lay.root}/bedrock-jobs")
        monkeypatch.setenv("BATCHPLAN_BEDROCK_BATCH_ROLE_ARN", "arn:aws:iam::123456789012:role/batch")
        conf = {"budget_usd": budget, "max_shards": 1, "queue_date": BEDROCK_DAY, "backend": "bedrock"}
        manifest = _nightly_by_batch(dagbag, env, conf, datetime(2026, 3, 7, 2, tzinfo=UTC), queue)
        stats = control.stats()
    assert stats["jobs"], "nothing went by batch"
    assert all(j["status"] == "Completed" for j in stats["jobs"])
    assert stats["creates"] == len(stats["jobs"])  # no job created twice
    assert stats["processed_twice"] == []
    assert manifest["spent_usd"] == pytest.approx(stats["billed_usd"], rel=1e-9)
    outcomes = storage.read_frame(f"{lay.outcomes(run)}/outcomes.parquet")
    assert outcomes.filter(pl.col("cost_usd") > 0).height == stats["billed_calls"]  # every billed call, once
    assert float(outcomes["cost_usd"].sum()) == pytest.approx(stats["billed_usd"], rel=1e-9)
    report = json.loads(storage.read_text(f"{lay.reports(run)}/report.json"))
    assert {m["mode"] for m in report["dispatch_modes"]["spend_by_mode"]} >= {"batch"}


@pytest.mark.slow
def test_nightly_audits_inside_the_budget_and_says_the_estimate_in_its_report(
    dagbag: Any, seeded: Done, copy_of: Callable[[Done], AirflowEnv], queue_days: dict[str, pl.DataFrame]
) -> None:
    """audit_share 0.1: the reference calls are planned and dispatched in the shards under the one budget, the
    delivered results stay one per query, an audited query is delivered its reference's answer where that is
    the likelier right (as the CLI does) while the estimate reads the plan's own answers, the report (and the
    run page's tab) gives the audited estimate with its interval, and the drift task emits the retrain's
    Asset only when drift was found."""
    from batchplan.core.contracts import audited_query_id, is_exploration
    from batchplan.plans.audit import AUDIT_DELIVERED_NOTE

    budget = 0.5  # the references (the history's best LLMs) of 45 queries cost ~$0.13 on this mix
    env = copy_of(seeded)
    # and exploring: at most 5% of the budget on the LLMs the references do not call, on the audited queries
    conf = {"budget_usd": budget, "max_shards": 2, "allow_deferral": True, "queue_date": ROUNDS_DAY, "audit_share": 0.1,
            "explore_share": 0.05}  # fmt: skip
    # a logical date of its own: the rounds test's run of 2026-03-03 02:00 sits in the same Airflow database
    dag_run = _nightly(dagbag, env, "nightly (audits)", datetime(2026, 3, 3, 4, tzinfo=UTC), conf)
    states = _succeeded(dag_run)
    lay, storage, run = env.layout, env.storage, f"nightly-{ROUNDS_DAY}"
    manifest = json.loads(storage.read_text(lay.results_manifest(run)))
    assert manifest["queries"] == queue_days[ROUNDS_DAY].height  # the delivered answers, one per query
    assert manifest["spent_usd"] <= budget  # the reference calls inside it
    audits = storage.read_frame(stages.audit_results_file(lay, run))
    explored = audits.filter(is_exploration())
    audits = audits.filter(~is_exploration())
    assert audits.height == round(0.1 * queue_days[ROUNDS_DAY].height)
    report = json.loads(storage.read_text(f"{lay.reports(run)}/report.json"))
    low, high = report["estimated_accuracy_ci95"]
    assert low <= report["estimated_accuracy"] <= high
    if manifest["rounds"]:  # in rounds: the rounds' posterior corrected by the audited sample, as the CLI's run
        assert report["audit"]["method"].startswith("difference estimator")
    assert report["spent_usd"] == pytest.approx(manifest["spent_usd"])
    exploration = report["audit"]["exploration"]  # the explore_share param reached the plan, inside the budget
    assert report["exploration"]["source"] == "asked"  # and the report says why it explored (the plan's manifest)
    assert exploration["queries"] == explored.height > 0
    assert exploration["calls"] >= explored.height
    assert exploration["spent_usd"] <= 0.05 * budget + 1e-9
    assert {audited_query_id(q) for q in explored["query_id"]} <= {audited_query_id(q) for q in audits["query_id"]}
    assert states["drift"] == ("success" if report["drift"] else "skipped")
    assert "audited estimate" in stages.report_html_for(storage, lay, "batchplan_nightly", dag_run.run_id)
    # the paid references delivered: each swapped query now carries its reference's answer...
    results = storage.read_frame(lay.results_file(run))
    swapped = results.filter(pl.col("note").str.contains(AUDIT_DELIVERED_NOTE, literal=True))
    assert swapped.height == report["audit"]["delivered_references"] > 0
    reference = {audited_query_id(q): a for q, a in audits.select("query_id", "answer").iter_rows()}
    assert all(a == reference[q] for q, a in swapped.select("query_id", "answer").iter_rows())
    # ...while the audit's records (the estimate's input) keep what the plan itself answered
    records = storage.read_frame(f"{lay.reports(run)}/audit.parquet")
    records = records.filter(pl.col("query_id").is_in(swapped["query_id"].implode()))
    assert records.height
    assert not records["agree"].fill_null(False).any()


def _drift_events(dag_run: Any) -> list[Any]:
    """The ``batchplan_drift`` Asset events the run's tasks emitted (what schedules the retrain DAG)."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(
            session.scalars(
                select(AssetEvent)
                .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                # by name: Airflow stores the URI normalized ("batchplan://drift/")
                .where(AssetModel.name == "batchplan_drift", AssetEvent.source_run_id == dag_run.run_id)
            )
        )


@pytest.mark.slow
def test_nightly_says_the_drift_late_labels_show_and_triggers_the_retrain(
    dagbag: Any, nightly_done: Done, copy_of: Callable[[Done], AirflowEnv], queue_days: dict[str, pl.DataFrame]
) -> None:
    """Run 1 (the nightly of NIGHTLY_DAY, made live-like: no correctness in its outcomes, no gold in its
    queries), then labels dropped under ``labels/<run 1>/`` saying the LLM it called most on a task was wrong
    on every query; run 2 (the next day's queue, no retrain between) joins them before it predicts, so its
    plan uses the labels' corrected estimate for that LLM (the live correction fitted again on the labels),
    its report's first lines and its run page's tab say DRIFT from the labels, and its drift task emits the
    retrain DAG's Asset."""
    env = copy_of(nightly_done)
    lay, storage, run1, run2 = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}", f"nightly-{ROUNDS_DAY}"
    outcomes_uri, queries_uri = f"{lay.outcomes(run1)}/outcomes.parquet", f"{lay.outcomes(run1)}/queries.parquet"
    scored, queries = storage.read_frame(outcomes_uri), storage.read_frame(queries_uri)
    storage.write_frame(scored.with_columns(correct=pl.lit(None, pl.Boolean), label_source=pl.lit(None, pl.String)), outcomes_uri)
    storage.write_frame(queries.with_columns(gold=pl.lit(None, pl.String)), queries_uri)
    # of tonight's tasks, the (task, LLM) run 1 called most on classification queries among those its plan
    # rated above 50%: labelled wrong every time
    tonight = queue_days[ROUNDS_DAY]["task"].unique().implode()
    answered = (
        scored.drop("task")
        .filter((pl.col("status") == "ok") & pl.col("answer").is_not_null())
        .unique(["query_id", "model"])
        .join(queries.select("query_id", "task", "labels"), on="query_id")
        .filter(pl.col("labels").is_not_null() & pl.col("task").is_in(tonight))
    )
    rated = storage.read_frame(lay.plan_file(run1, "predictions.parquet")).select("query_id", "model", "p_correct")
    pairs = answered.join(rated, on=["query_id", "model"]).group_by("task", "model").agg(pl.len(), pl.col("p_correct").mean())
    task, llm, n, _ = pairs.filter(pl.col("p_correct") > 0.5).sort("len", "task", "model", descending=True).row(0)
    assert n >= 12, f"run 1 must have called one LLM on a dozen queries of a task run 2 has: {pairs}"
    mine = answered.filter((pl.col("task") == task) & (pl.col("model") == llm))
    wrong = [next(label for label in labels if label != answer) for answer, labels in mine.select("answer", "labels").iter_rows()]
    storage.write_frame(pl.DataFrame({"query_id": mine["query_id"], "gold": wrong}), f"{lay.labels(run1)}late.csv")
    before = _mean_p(storage, lay, run1, task, llm)  # what the promoted predictor says, uncorrected

    conf = {"budget_usd": 0.05, "max_shards": 2, "allow_deferral": True, "queue_date": ROUNDS_DAY, "rounds": 1}
    # a logical date of its own: the rounds and audits tests' runs of 2026-03-03 sit in the same Airflow database
    dag_run = _nightly(dagbag, env, "nightly (after late labels)", datetime(2026, 3, 3, 6, tzinfo=UTC), conf)
    states = _succeeded(dag_run)
    # the labels were joined into run 1 before run 2 predicted: its calls of those queries now gold
    assert storage.read_frame(outcomes_uri).filter(pl.col("label_source") == "gold")["query_id"].n_unique() == n
    # run 2's plan used the labels' correction: its estimate for the LLM on that task moved down, no retrain
    offsets = storage.read_frame(lay.plan_file(run2, stages.LIVE_OFFSETS_FILE))
    row = offsets.filter((pl.col("task") == task) & (pl.col("model") == llm))
    assert row.height == 1
    assert row["gold_rows"][0] == n
    assert row["live_acc"][0] == 0.0
    assert row["offset"][0] < 0
    after = _mean_p(storage, lay, run2, task, llm)
    assert after < before - 0.05, (before, after)
    # said out loud: the report's drift (labels), its first lines in the run page's tab, and the Asset event
    report = json.loads(storage.read_text(f"{lay.reports(run2)}/report.json"))
    drifted = [d for d in report["drift"] if d.get("source") == "labels" and (d["name"], d["task"]) == (llm, task)]
    assert drifted
    assert drifted[0]["direction"] == "worse"
    assert drifted[0]["calls"] == n
    html = stages.report_html_for(storage, lay, "batchplan_nightly", dag_run.run_id)
    assert html is not None
    assert f"DRIFT: LLM {llm} on {task} is worse than the history says: labelled accuracy 0.0% over {n} labels" in html
    assert html.index("DRIFT:") < html.index("<h2")  # its first lines
    assert states["drift"] == "success"
    assert len(_drift_events(dag_run)) == 1


def _mean_p(storage: Storage, lay: Layout, run: str, task: str, llm: str) -> float:
    """The run's mean predicted P(correct) of ``llm`` on ``task``'s queries."""
    queue = storage.read_frame(lay.plan_file(run, "queue.parquet")).select("query_id", "task")
    predictions = storage.read_frame(lay.plan_file(run, "predictions.parquet")).join(queue, on="query_id")
    return float(predictions.filter((pl.col("task") == task) & (pl.col("model") == llm))["p_correct"].mean())  # type: ignore[arg-type]


@pytest.mark.slow
def test_backfill_shares_one_budget_across_days(backfill_done: Done) -> None:
    budget = backfill_done.conf["budget_usd"]
    _succeeded(backfill_done.dag_run)
    lay, storage = backfill_done.env.layout, backfill_done.env.storage
    run = f"backfill-{BACKFILL_DAYS[0]}-2026-02-23"
    shards = json.loads(storage.read_text(lay.shards_manifest(run)))["shards"]
    assert [s["group"] for s in shards] == list(BACKFILL_DAYS)  # the empty 23rd is ignored
    shares = [s["budget_usd"] for s in shards]
    assert sum(shares) <= budget
    assert len({round(s, 9) for s in shares}) > 1, "shares follow the joint plan, not an even split"
    manifest = json.loads(storage.read_text(lay.results_manifest(run)))
    assert manifest["queries"] == BACKFILL_QUERIES_PER_DAY * len(BACKFILL_DAYS)
    assert manifest["spent_usd"] <= budget
    assert storage.exists(lay.report_html(run))


@pytest.mark.slow
def test_backfill_resumes_day_by_day_when_triggered_again(
    dagbag: Any, backfill_done: Done, copy_of: Callable[[Done], AirflowEnv]
) -> None:
    env = copy_of(backfill_done)
    lay, storage = env.layout, env.storage
    run = f"backfill-{BACKFILL_DAYS[0]}-2026-02-23"
    before_calls = _paid_calls(storage, lay.results(run))
    before = json.loads(storage.read_text(lay.results_manifest(run)))
    # As if the run had died while dispatching the middle day: its results file was never written.
    storage.delete(f"{lay.shard_results(run, BACKFILL_DAYS[1])}/results.parquet")
    dag_run = _run(
        dagbag,
        env,
        "batchplan_backfill",
        "backfill (triggered again)",
        logical_date=datetime(2026, 3, 5, tzinfo=UTC),
        run_conf=backfill_done.conf,
    )
    _succeeded(dag_run)
    assert storage.exists(f"{lay.shard_results(run, BACKFILL_DAYS[1])}/results.parquet")
    assert _paid_calls(storage, lay.results(run)) == before_calls
    after = json.loads(storage.read_text(lay.results_manifest(run)))
    assert after["spent_usd"] == pytest.approx(before["spent_usd"])
    assert after["status"] == before["status"]


@pytest.mark.slow
def test_retrain_decides_on_new_outcomes(
    dagbag: Any, backfill_done: Done, copy_of: Callable[[Done], AirflowEnv]
) -> None:
    env = copy_of(backfill_done)  # a promoted predictor and the backfill's outcomes
    lay, storage = env.layout, env.storage
    first = json.loads(storage.read_text(lay.current_predictor()))["version"]
    dag_run = _retrain(dagbag, env, "retrain (on outcomes)", datetime(2026, 3, 4, tzinfo=UTC), round_choice=False)
    _succeeded(dag_run)
    decisions = [u for u in storage.list(f"{lay.predictors()}/decisions/") if u.endswith(".json")]
    assert len(decisions) == 2
    latest = json.loads(storage.read_text(sorted(decisions)[-1]))
    assert latest["current"] == first
    # The backfill's queues were drawn from the held-out split, so their outcomes are found
    # but kept out of training: the evaluation stays clean.
    assert latest["outcomes_found"] > 0
    assert latest["outcomes_used"] <= latest["outcomes_found"]
    assert latest["current_score"] is not None
    # the backfill's replayed outcomes are gold and plentiful: the promotion is judged on them, not the holdout
    assert latest["source"] == "gold"
    assert latest["silver"] is False
    assert latest["eval_pairs"] >= latest["min_live_rows"]
    assert latest["eval_runs"]
    now = json.loads(storage.read_text(lay.current_predictor()))["version"]
    assert now == (latest["candidate"] if latest["promoted"] else first)
    assert artifacts.load_round_choice(storage, lay.predictors(), latest["candidate"]) is None  # trained without it
    print("dag.test timings:", {k: round(v, 1) for k, v in env.timings.items()})


@pytest.mark.slow
def test_retrain_joins_late_labels_of_a_past_nightly_run_before_training(
    dagbag: Any, nightly_done: Done, copy_of: Callable[[Done], AirflowEnv], real_history: History
) -> None:
    """Labels dropped under ``labels/<run>/`` for a past nightly run (made live-like: no correctness in its
    outcomes, no gold in its queries) are joined by the retrain DAG before it trains: those queries' calls get
    gold correctness, and the decision record counts them as the outcomes found."""
    env = copy_of(nightly_done)
    lay, storage, run = env.layout, env.storage, f"nightly-{NIGHTLY_DAY}"
    outcomes_uri, queries_uri = f"{lay.outcomes(run)}/outcomes.parquet", f"{lay.outcomes(run)}/queries.parquet"
    scored = storage.read_frame(outcomes_uri)  # the replay backend scored them from its history
    labelled = sorted(scored.filter(pl.col("label_source") == "gold")["query_id"].unique().to_list())[:20]
    storage.write_frame(scored.with_columns(correct=pl.lit(None, pl.Boolean), label_source=pl.lit(None, pl.String)), outcomes_uri)
    storage.write_frame(storage.read_frame(queries_uri).with_columns(gold=pl.lit(None, pl.String)), queries_uri)
    gold = real_history.queries.filter(pl.col("query_id").is_in(labelled)).select("query_id", "gold")
    storage.write_frame(gold, f"{lay.labels(run)}labels.jsonl")
    dag_run = _retrain(dagbag, env, "retrain (late labels)", datetime(2026, 3, 6, tzinfo=UTC), round_choice=False)
    _succeeded(dag_run)
    joined = storage.read_frame(outcomes_uri)
    taught = joined.filter(pl.col("correct").is_not_null())
    assert sorted(taught["query_id"].unique().to_list()) == labelled
    assert (taught["label_source"] == "gold").all()
    # the labels' gold is the history's: each labelled call's correctness is what the replay had scored
    expected = scored.filter(pl.col("query_id").is_in(labelled) & pl.col("correct").is_not_null())
    key = ["query_id", "round", "call"]
    assert taught.select(*key, "correct").sort(key).equals(expected.select(*key, "correct").sort(key))
    assert storage.read_frame(f"{lay.outcomes(run)}/labels.parquet")["source_file"].unique().to_list() == [
        f"{lay.labels(run)}labels.jsonl"
    ]
    latest = json.loads(storage.read_text(lay.decision("v20260306T000000")))  # this run's (predictor_version)
    assert latest["outcomes_found"] == taught.unique(["query_id", "model"]).height  # the labelled calls, only
    assert latest["outcomes_used"] <= latest["outcomes_found"]


def test_claim_race_has_exactly_one_winner(s3_bucket: str, s3_storage: Storage) -> None:
    from concurrent.futures import ThreadPoolExecutor

    lay = Layout(f"{s3_bucket}/race")

    def attempt(owner: str) -> str | None:
        try:
            common.claim_queue(s3_storage, lay, "2026-01-01", owner)
        except common.QueueClaimed:
            return None
        return owner

    with ThreadPoolExecutor(max_workers=6) as pool:
        winners = [w for w in pool.map(attempt, [f"dag/run-{i}" for i in range(6)]) if w]
    assert len(winners) == 1
    assert attempt(winners[0]) == winners[0], "the winner may resume"


def test_report_plugin_serves_a_runs_report(airflow_env: AirflowEnv) -> None:
    sys.path.insert(0, str(DAGS / "plugins"))
    try:
        import batchplan_reports
    finally:
        sys.path.pop(0)
    lay, storage = airflow_env.layout, airflow_env.storage
    storage.write_text(lay.report_html("nightly-2026-01-01"), "<html>batchplan report</html>")
    stages.index_report(storage, lay, "batchplan_nightly", "scheduled__2026-01-01T02:00:00+00:00", "nightly-2026-01-01")
    served = batchplan_reports.report("batchplan_nightly", "scheduled__2026-01-01T02:00:00+00:00")
    assert served.status_code == 200
    assert b"batchplan report" in served.body
    missing = batchplan_reports.report("batchplan_nightly", "nope")
    assert missing.status_code == 404
    assert b"No batchplan report for batchplan_nightly / nope yet" in missing.body  # a sentence in the tab
    routes = {getattr(r, "path", "") for r in batchplan_reports.app.routes}
    assert "/reports/{dag_id}/{run_id}" in routes
    view = batchplan_reports.BatchplanReportsPlugin.external_views[0]
    assert view["destination"] == "dag_run"
    assert "{RUN_ID}" in view["href"]
