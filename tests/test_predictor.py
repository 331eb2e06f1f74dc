"""Predictor: interface, calibration against a known truth, registry round trips, cold start, determinism."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from batchplan.core.catalog import PriceCatalog
from batchplan.core.contracts import PREDICTION_SCHEMA, ContractError
from batchplan.core.history import History, synthetic_history
from batchplan.core.storage import Storage
from batchplan.predictors import Predictor, available_predictors, list_versions, load_predictor, train_predictor
from batchplan.predictors.calibration import fit_isotonic, fit_platt
from batchplan.predictors.features import _distinct
from batchplan.predictors.metrics import auc, ece
from tests.support.factories import predictor_queue, recorded_pairs

FAST: dict[str, int] = {"folds": 4}


@pytest.fixture(scope="module")
def trained(small_history: History) -> Predictor:
    return train_predictor(small_history.split("train"), name="lightgbm", seed=0, **FAST)


def test_registry_names() -> None:
    names = available_predictors()
    assert {"lightgbm", "prior"} <= set(names)
    with pytest.raises(ContractError, match="unknown predictor 'nope': the known predictors are"):
        train_predictor(synthetic_history(50, 2), name="nope")


def test_predict_schema_and_ranges(trained: Predictor, small_history: History) -> None:
    test = small_history.split("test")
    preds = trained.predict(predictor_queue(test), recorded_pairs(test))
    assert preds.height == test.outcomes.height
    for column, dtype in PREDICTION_SCHEMA.items():
        assert preds.schema[column] == dtype
    assert preds["p_correct"].is_between(0, 1).all()
    assert (preds["cost_usd"] > 0).all()
    assert (preds["cost_high_usd"] >= preds["cost_usd"]).all()
    assert preds.select("query_id", "model").equals(recorded_pairs(test))
    y = test.outcomes["correct"].cast(pl.Float64).to_numpy()
    assert auc(y, preds["p_correct"].to_numpy()) > 0.7
    assert trained.models == sorted(small_history.models)
    assert trained.metadata["models"]


def test_text_encoder_embeds_each_distinct_tail_once(trained: Predictor, small_history: History) -> None:
    """A batch that repeats prompts gets, row by row, the bits each prompt gets alone; only the distinct tails
    (the part the encoder reads) are tokenized."""
    encoder = trained.encoder
    prompts = predictor_queue(small_history)["prompt"].head(40)
    repeated = pl.concat([prompts, prompts.reverse(), prompts.head(5), pl.Series([None], dtype=pl.String)])
    alone = np.vstack([encoder.transform(pl.Series([p], dtype=pl.String)) for p in repeated.to_list()])
    together = encoder.transform(repeated)
    assert together.dtype == np.float32
    assert np.array_equal(together.view(np.uint32), alone.view(np.uint32))
    tails, inverse = _distinct(repeated.fill_null("").str.tail(encoder.tail))
    assert inverse is not None
    assert len(tails) == prompts.fill_null("").str.tail(encoder.tail).n_unique() + 1
    assert tails.gather(inverse).equals(repeated.fill_null("").str.tail(encoder.tail).rename(tails.name))
    assert _distinct(pl.Series(["a", "b"]))[1] is None  # nothing repeats: no gather


def test_text_encoder_gives_the_same_bits_in_slices_on_threads(trained: Predictor, small_history: History) -> None:
    """A large batch is embedded in row slices on several threads: each row gets the bits of one pass."""
    encoder = trained.encoder
    prompts = pl.concat([predictor_queue(small_history)["prompt"], pl.Series([None, ""], dtype=pl.String)])
    whole = encoder.transform(prompts, slice_rows=len(prompts))
    sliced = encoder.transform(prompts, slice_rows=7)
    assert sliced.shape == whole.shape == (len(prompts), encoder.dim)
    assert np.array_equal(sliced.view(np.uint32), whole.view(np.uint32))


def test_calibration_against_known_truth() -> None:
    """Synthetic history whose true P(correct) is a logistic of known terms: predictions must be calibrated
    (ECE small) on fresh draws, and close to the true probabilities."""
    history = synthetic_history(1_200, 6, seed=5)
    predictor = train_predictor(history.split("train"), seed=0, **FAST)
    test = history.split("test")
    preds = predictor.predict(predictor_queue(test), recorded_pairs(test))
    y = test.outcomes["correct"].cast(pl.Float64).to_numpy()
    p = preds["p_correct"].to_numpy()
    assert ece(y, p) < 0.05
    assert abs(p.mean() - y.mean()) < 0.03
    assert predictor.metadata["validation"]["calibrator"] in {"identity", "platt", "isotonic"}


def test_calibrators_recover_a_known_map() -> None:
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.02, 0.98, 20_000)
    y = (rng.random(true_p.size) < true_p).astype(float)
    distorted = true_p**2  # overconfident in the wrong direction: a monotone distortion
    for fit in (fit_platt, fit_isotonic):
        calibrator = fit(distorted, y)
        assert ece(y, calibrator(distorted)) < 0.02
    assert ece(y, distorted) > 0.1


def test_unknown_model_cold_start(trained: Predictor, small_history: History) -> None:
    test = small_history.split("test")
    queue = predictor_queue(test)
    new = "synth-99-70b"
    pairs = pl.concat([recorded_pairs(test), queue.select("query_id", pl.lit(new).alias("model"))])
    catalog = PriceCatalog.from_prices(
        pl.concat(
            [small_history.prices, pl.DataFrame({"model": [new], "usd_per_mtok_in": [4.0], "usd_per_mtok_out": [12.0]})]
        )
    )
    preds = trained.predict(queue, pairs, catalog=catalog)
    fresh = preds.filter(pl.col("model") == new)
    assert fresh.height == queue.height
    assert fresh["p_correct"].is_between(0.01, 0.99).all()
    assert not fresh["known_model"].any()
    assert (fresh["cost_source"] == "tokens").all()
    # priced like the dearest synthetic model, so it borrows the dear (accurate) models' accuracy
    by_model = preds.group_by("model").agg(pl.col("p_correct").mean()).sort("p_correct")
    assert by_model["model"].to_list().index(new) >= len(by_model) // 2
    # no price anywhere: still a prediction, flagged cold
    bare = trained.predict(queue, queue.select("query_id", pl.lit("mystery-model").alias("model")))
    assert bare["p_correct"].is_finite().all()
    assert (bare["cost_source"] == "cold").all()
    assert (bare["cost_usd"] > 0).all()


def test_prior_predictor(small_history: History) -> None:
    predictor = train_predictor(small_history.split("train"), name="prior")
    test = small_history.split("test")
    preds = predictor.predict(predictor_queue(test), recorded_pairs(test))
    assert preds["p_correct"].is_between(0, 1).all()
    assert not predictor.boosters


def test_pairs_must_name_known_queries(trained: Predictor, small_history: History) -> None:
    queue = predictor_queue(small_history.split("test"))
    with pytest.raises(ValueError, match="absent from queries"):
        trained.predict(queue, pl.DataFrame({"query_id": ["nope"], "model": ["synth-00"]}))
    assert trained.predict(queue, pl.DataFrame(schema={"query_id": pl.String, "model": pl.String})).height == 0


def test_null_task_defaults(trained: Predictor, small_history: History) -> None:
    queue = predictor_queue(small_history.split("test")).with_columns(pl.lit(None, dtype=pl.String).alias("task")).head(20)
    preds = trained.predict(queue, queue.select("query_id", pl.lit("synth-01").alias("model")))
    assert preds["p_correct"].is_finite().all()


def test_determinism_with_seed(small_history: History) -> None:
    train = small_history.split("train")
    test = small_history.split("test")
    a = train_predictor(train, seed=3, **FAST).predict(predictor_queue(test), recorded_pairs(test))
    b = train_predictor(train, seed=3, **FAST).predict(predictor_queue(test), recorded_pairs(test))
    assert a.equals(b)


def _roundtrip(predictor: Predictor, storage: Storage, root: str, history: History) -> None:
    test = history.split("test")
    uri = predictor.save(storage, root)
    assert uri.startswith(root)
    loaded = load_predictor(storage, root)
    assert loaded.metadata["version"] == uri.rsplit("/", 1)[-1]
    assert loaded.models == predictor.models
    before = predictor.predict(predictor_queue(test), recorded_pairs(test))
    after = loaded.predict(predictor_queue(test), recorded_pairs(test))
    assert np.allclose(before["p_correct"].to_numpy(), after["p_correct"].to_numpy(), atol=1e-9)
    assert np.allclose(before["cost_usd"].to_numpy(), after["cost_usd"].to_numpy())
    second = predictor.save(storage, root, version="99990101T000000-later")
    assert list_versions(storage, root)[-1] == "99990101T000000-later"
    assert load_predictor(storage, root).metadata["version"] == "99990101T000000-later"
    assert load_predictor(storage, root, version=uri.rsplit("/", 1)[-1]).models == predictor.models
    assert second.endswith("99990101T000000-later")
    # a version still being written (no metadata.json yet) is not "latest"
    storage.write_text(f"{root}/99999999T999999-partial/state.json", "{}")
    assert load_predictor(storage, root).metadata["version"] == "99990101T000000-later"
    # standard JSON only (no NaN / Infinity tokens)
    for name in ("metadata.json", "state.json"):
        json.loads(storage.read_text(f"{uri}/{name}"), parse_constant=_reject_constant)
    meta = loaded.metadata
    for key in ("features", "training_data", "models", "validation", "created_at"):
        assert key in meta
    assert meta["training_data"]["fingerprint"]


def _reject_constant(token: str) -> None:
    raise ValueError(f"non-standard JSON constant {token}")


def test_registry_roundtrip_local(trained: Predictor, small_history: History, tmp_path: object) -> None:
    _roundtrip(trained, Storage(), f"{tmp_path}/predictors", small_history)


def test_registry_roundtrip_s3(trained: Predictor, small_history: History, s3_storage: Storage, s3_bucket: str) -> None:
    _roundtrip(trained, s3_storage, f"{s3_bucket}/models/predictor", small_history)


def test_no_label_leak_on_noise() -> None:
    """Outcomes that are pure coin flips: out-of-fold validation must not find signal (a leave-one-out
    retrieval feature would: it moves by exactly the row's own label)."""
    history = synthetic_history(600, 4, seed=7)
    rng = np.random.default_rng(0)
    noise = History(
        queries=history.queries,
        outcomes=history.outcomes.with_columns(pl.Series("correct", rng.random(history.outcomes.height) < 0.6)),
        prices=history.prices,
    )
    predictor = train_predictor(noise.split("train"), seed=0, **FAST)
    assert predictor.metadata["validation"]["overall"]["auc"] < 0.56
    test = noise.split("test")
    preds = predictor.predict(predictor_queue(test), recorded_pairs(test))
    assert abs(auc(test.outcomes["correct"].cast(pl.Float64).to_numpy(), preds["p_correct"].to_numpy()) - 0.5) < 0.06


def test_token_quantiles_and_cost(trained: Predictor, small_history: History) -> None:
    assert {"tokens_mean", "tokens_p50", "tokens_p90"} <= set(trained.boosters)
    test = small_history.split("test")
    preds = trained.predict(predictor_queue(test), recorded_pairs(test))
    assert (preds["tokens_out_p90"] >= preds["tokens_out"] - 1e-9).all()
    actual = test.outcomes["tokens_out"].to_numpy()
    assert np.mean(actual <= preds["tokens_out_p90"].to_numpy() + 1e-9) >= 0.8
    billed = test.outcomes["cost_usd"].to_numpy()
    assert np.mean(billed <= preds["cost_high_usd"].to_numpy()) >= 0.8
    assert np.median(np.abs(preds["cost_usd"].to_numpy() - billed) / billed) < 0.2
    # a history without usage columns: billed-cost path, still a high side above the expected cost
    bare = History(
        queries=small_history.queries,
        outcomes=small_history.outcomes.with_columns(
            pl.lit(None, dtype=pl.Int64).alias("tokens_in"), pl.lit(None, dtype=pl.Int64).alias("tokens_out")
        ),
        prices=small_history.prices.clear(),
    )
    billed_only = train_predictor(bare.split("train"), name="prior")
    bp = billed_only.predict(predictor_queue(test), recorded_pairs(test))
    assert (bp["cost_source"] == "billed").all()
    assert np.median(np.abs(bp["cost_usd"].to_numpy() - billed) / billed) < 0.2


def test_confusion(trained: Predictor) -> None:
    table = trained.confusion("task1", "synth-00")
    assert table.height > 0
    sums = table.group_by("gold").agg(pl.col("p").sum())["p"].to_numpy()
    assert np.allclose(sums, 1.0)
    pooled = trained.confusion("task1", "never-seen-model")
    assert np.allclose(pooled.group_by("gold").agg(pl.col("p").sum())["p"].to_numpy(), 1.0)
    assert trained.confusion("no-such-task", "synth-00").height == 0
