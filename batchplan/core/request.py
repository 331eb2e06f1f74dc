"""What the user asks for one batch, checked where it is made.

Standard library only, so that the CLI refuses a bad flag at once, before it imports polars, LightGBM and
the solvers. Messages name the request's fields (``budget_usd``), which are the DAG params' names too; the
CLI words them as its flags (``batchplan.core.errors.UserError.worded``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from batchplan.core.errors import ContractError

if TYPE_CHECKING:
    from batchplan.optimizer.api import Method

PLAN_KINDS: Final = ("single", "vote", "cascade", "agreement")  # semantics: batchplan/plans/simulation.py


@dataclass
class PlanRequest:
    """What the user asks for one batch. Either ``budget_usd`` (maximize accuracy) or ``accuracy_target``
    (minimize cost), or both (maximize accuracy under the budget with the target as a floor)."""

    budget_usd: float | None = None
    accuracy_target: float | None = None
    allow_deferral: bool = False
    tenant_budgets_usd: dict[str, float] = field(default_factory=dict)
    model_max_calls: dict[str, int] = field(default_factory=dict)
    task_accuracy_floors: dict[str, float] = field(default_factory=dict)
    allowed_models: dict[str, list[str]] = field(default_factory=dict)  # tenant -> models (data residency)
    kinds: tuple[str, ...] = PLAN_KINDS  # plan kinds the optimizer may choose from
    # Statewise error bound: task ("*" = every task) -> alpha, or label -> alpha, bounding
    # P(wrong | true label = y) <= alpha_y. Mode "per_query": only plans that meet it are offered; "aggregate":
    # the batch as a whole meets it (a linear constraint per task and label).
    label_error_max: dict[str, float | dict[str, float]] = field(default_factory=dict)
    label_error_mode: str = "per_query"
    # Plan so that realized spend stays within the budget with this probability (normal approximation over
    # the plans' cost variances): a query deferred by the dispatcher's hard stop is a lost answer.
    spend_confidence: float = 0.95
    method: Method = "auto"
    # A constraint naming a tenant, model or task the batch does not have is refused (a typo caps nothing);
    # a nightly config that lists every tenant opts in, and the report lists what bound nothing.
    allow_unused_constraints: bool = False
    # Audits: this share of the queries (a uniform sample seeded by ``audit_seed``, the run id) also gets a
    # reference answer, paid from the same budget (batchplan.plans.audit); 0: none.
    audit_share: float = 0.0
    audit_seed: str = ""
    # and at most this share of budget_usd on them (None: no cap): the sample, in its random order, stops
    # where the references' expected cost would pass it, so audits cost the same share at any budget
    audit_spend_share: float | None = None
    # Exploration: at most this share of budget_usd on calls of the LLMs the audit's reference does not call, on
    # the audit sample's queries (batchplan.plans.audit.explore_plan), so labels and silver reach the LLMs the
    # plan never calls (a drift that reorders the LLMs is otherwise never seen); 0: none. Inside the budget.
    # None (the default): automatic, ``AUTO_EXPLORE_SHARE`` of the drifted tasks' part of the budget, on their
    # queries, when the live labels put an LLM of the batch's tasks outside the history's interval, else none
    # (``plans.planning.choose_exploration`` decides, before planning)
    explore_share: float | None = None

    @property
    def audit_max_cost_usd(self) -> float | None:
        """What the audits' reference calls may cost at most (``audit_spend_share`` of the budget); None: no cap."""
        if self.audit_spend_share is None or self.budget_usd is None:
            return None
        return self.audit_spend_share * self.budget_usd

    def __post_init__(self) -> None:
        if self.budget_usd is None and self.accuracy_target is None:
            raise ContractError(
                "give budget_usd (maximize accuracy under it) or accuracy_target (the cheapest plan reaching it), "
                "or both",
                fields=("budget_usd", "accuracy_target"),
            )
        if self.budget_usd is not None and not self.budget_usd >= 0:
            raise ContractError(f"budget_usd must be >= 0, got {self.budget_usd:g}", fields=("budget_usd",))
        if self.accuracy_target is not None and not 0 < self.accuracy_target <= 1:
            raise ContractError(
                f"accuracy_target must be in (0, 1], got {self.accuracy_target:g}", fields=("accuracy_target",)
            )
        if self.label_error_mode not in ("per_query", "aggregate"):
            raise ContractError(
                f"label_error_mode must be 'per_query' or 'aggregate', got {self.label_error_mode!r}",
                fields=("label_error_mode",),
            )
        if not 0 <= self.audit_share < 1:
            raise ContractError(f"audit_share must be in [0, 1), got {self.audit_share:g}", fields=("audit_share",))
        if self.audit_spend_share is not None and not 0 < self.audit_spend_share < 1:
            raise ContractError(
                f"audit_spend_share must be in (0, 1), got {self.audit_spend_share:g}", fields=("audit_spend_share",)
            )
        if self.explore_share is not None and not 0 <= self.explore_share < 1:
            raise ContractError(f"explore_share must be in [0, 1), got {self.explore_share:g}", fields=("explore_share",))
        unknown = sorted(set(self.kinds) - set(PLAN_KINDS))
        if unknown or "single" not in self.kinds:
            raise ContractError(
                f"kinds must include 'single' and be among {', '.join(PLAN_KINDS)}; got {', '.join(self.kinds)}",
                fields=("kinds",),
            )
        for name, value in self.tenant_budgets_usd.items():
            if not value >= 0:
                raise ContractError(
                    f"tenant_budgets_usd: {name}={value:g} must be >= 0", fields=("tenant_budgets_usd",)
                )
        for name, calls in self.model_max_calls.items():
            if not calls >= 0:
                raise ContractError(f"model_max_calls: {name}={calls} must be >= 0", fields=("model_max_calls",))
        for name, floor in self.task_accuracy_floors.items():
            if not 0 <= floor <= 1:
                raise ContractError(
                    f"task_accuracy_floors: {name}={floor:g} must be in [0, 1]", fields=("task_accuracy_floors",)
                )


LIVE_AUDIT_SHARE: Final = 0.05
# the automatic exploration's share of the budget, on while the labels say the history is off (README, Exploration):
# always on (0.05) it cost ~0.5 points without drift. Turned on at drift it starts nights late (the labels that show
# the drift come first), so it explores more: bench/nights.py, llama3.1-70b:-0.3, nights 3-10 against the
# never-learned predictor: +3.9 points at 0.10, +1.1 at 0.05 (+0.9 never exploring)
AUTO_EXPLORE_SHARE: Final = 0.10
# `batchplan run` and the nightly and backfill DAGs without --rounds / --round-planner: 3 rounds of the round
# planner "per_task" (batchplan.plans.per_task) measured best (README, Rounds; bench/quality.py,
# bench/rounds_faults.py): the posterior re-plans the tasks whose history has logprobs no cascade template uses
# (cascades_open: +1.8..+3.6 points over single shot), the single-shot plan runs the rest step by step (as
# single shot on a healthy endpoint, re-calling what failed on a flaky one).
DEFAULT_RUN_ROUNDS: Final = 3
DEFAULT_ROUND_PLANNER: Final = "per_task"


def default_audit_share(asked: float | None, backend: str) -> float:
    """The audit share a run uses: what was asked; else 5% for a live backend (no gold comes back: the audits
    are the run's only accuracy evidence), single shot or in rounds, and none for replay (the history scores
    it)."""
    if asked is not None:
        return asked
    return LIVE_AUDIT_SHARE if backend != "replay" else 0.0


# Audits at the default share cost at most this share of the budget (bench/nights.py: at 0.5 x the best
# single LLM's cost, 10% of the queries audited took 20-35% of the spend and 2.7 points of accuracy; capped at
# 5% of the budget they cost nothing measurable, at 10% ~1 point)
LIVE_AUDIT_SPEND_SHARE: Final = 0.05


def default_audit_spend_share(asked: float | None, audit_share_asked: float | None, backend: str) -> float | None:
    """The audits' spend cap: what was asked; else LIVE_AUDIT_SPEND_SHARE where the audit share is the live
    default; else none (an audit share the user asked for is not shrunk by a cap they did not ask for)."""
    if asked is not None:
        return asked
    return LIVE_AUDIT_SPEND_SHARE if audit_share_asked is None and backend != "replay" else None


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([dhms]))", re.IGNORECASE)
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(z|utc)?", re.IGNORECASE)
_UNIT_SECONDS: Final = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}


def deadline_at(text: str, now: datetime | None = None) -> float:
    """The deadline (``--deadline``, DAG param ``deadline``) as a POSIX timestamp: a duration from ``now``
    (``6h``, ``90m``, ``1h30m``, ``1.5h``, ``2d``) or the next time the clock shows an hour of the day
    (``06:00`` local time, ``06:00Z`` UTC; one that has passed today is tomorrow's)."""
    now = now or datetime.now().astimezone()
    value = text.strip()
    if value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION.findall(value))
        if seconds <= 0:
            raise ContractError(f"deadline {text!r} must be a positive duration", fields=("deadline",))
        return now.timestamp() + seconds
    if match := _CLOCK.fullmatch(value):
        base = now.astimezone(UTC) if match[3] else now.astimezone()  # local time unless Z/UTC
        at = base.replace(hour=int(match[1]), minute=int(match[2]), second=0, microsecond=0)
        if at <= base:
            at += timedelta(days=1)
        return at.timestamp()
    raise ContractError(
        f"deadline {text!r} is neither a duration (6h, 90m, 1h30m) nor an hour of the day (06:00, 06:00Z for UTC)",
        fields=("deadline",),
    )
