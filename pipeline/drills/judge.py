"""Judging a drill: pure functions of what was observed (``RunRecord``) and the config, so that each can be
checked with hand-made inputs (tests/faults/test_judge.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.config import KINDS, Config
from pipeline.data.mixing import SourceSampler, mixture


@dataclass
class DrillResult:
    scenario: str
    expected: str
    observed: str
    passed: bool
    steps_redone: int | None = None
    rows_differ: int | None = None  # rows trained that an unfaulted run would not have trained (must be 0)
    samples_lost: int | None = None  # consumed by an unfaulted run but not by this one (must be 0)
    recover_s: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """A finished run as a drill observed it."""

    final: dict  # ``step`` and ``samples/<kind>``
    step_log: list[tuple[int, float]]  # (step, wall time) of every logged step, redone steps again
    mlflow_runs: int
    events: list[dict]  # pipeline.train.events, oldest first
    kinds: dict[int, set[str]] = field(default_factory=dict)  # kinds logged at each step (redone: again)
    # fingerprints of the rows each step trained, as logged (redone: again), and of those an unfaulted run
    # trains at that step (``pipeline.data.datasets.step_rows``)
    keys: dict[int, list[int]] = field(default_factory=dict)
    expected_keys: dict[int, int] = field(default_factory=dict)
    rows_per_step: int = 0

    def of(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    @property
    def resumed_at(self) -> list[int]:
        """Steps that (re)started worker groups resumed from a checkpoint at."""
        return [e["step"] for e in self.of("train_start") if e["resumed_from"]]


def kind_sequence(config: Config, steps: int) -> list[str]:
    """The kind of steps 1..``steps`` of an unfaulted run: that of its source, a pure function of the
    ratios and ``data.seed`` (``SourceSampler``, identical on every rank, across restarts and at every
    world size)."""
    sources = config.data.named_sources()
    sampler = SourceSampler(mixture(config.data), config.data.seed)
    return [sources[next(sampler)].kind for _ in range(steps)]


def expected_samples(config: Config, steps: int) -> dict[str, int]:
    """Samples per kind that ``steps`` unfaulted steps consume (the global batch does not depend on the
    world size: ``data.batch_size`` x ``train.num_workers`` x ``train.grad_accum``)."""
    counts = Counter(kind_sequence(config, steps))
    per_step = config.data.batch_size * config.train.grad_accum * config.train.num_workers
    return {kind: counts[kind] * per_step for kind in KINDS}


def rows_differ(run: RunRecord) -> int:
    """Rows of steps whose logged rows (any time they were logged) are not the unfaulted run's: a step's
    fingerprint covers all its rows, so a differing step counts all of them."""
    wrong = [
        s for s, expected in run.expected_keys.items() if any(k != expected for k in run.keys.get(s, [None]))
    ]
    return len(wrong) * run.rows_per_step


def kinds_differ(config: Config, run: RunRecord, steps: int) -> list[int]:
    """Steps whose logged kind (every time it was logged) is not the unfaulted run's."""
    expected = kind_sequence(config, steps)
    return [s for s in range(1, steps + 1) if run.kinds.get(s, set()) != {expected[s - 1]}]


def sample_accounting(config: Config, metrics: dict, steps: int) -> tuple[int, int]:
    """(samples lost, samples counted twice) of a finished run against the unfaulted sequence."""
    expected = expected_samples(config, steps)
    observed = {kind: int(metrics.get(f"samples/{kind}", 0)) for kind in KINDS}
    lost = sum(max(0, expected[k] - observed[k]) for k in KINDS)
    doubled = sum(max(0, observed[k] - expected[k]) for k in KINDS)
    return lost, doubled


def redone_steps(log: list[tuple[int, float]]) -> int:
    return sum(n - 1 for n in Counter(s for s, _ in log).values())


def recovery_time(log: list[tuple[int, float]], fault_at: float) -> float | None:
    """Seconds from the fault to the first step logged after it (training going again)."""
    after = [t for _, t in log if t > fault_at]
    return round(min(after) - fault_at, 1) if after else None


def judge_recovery(
    scenario: str, expected: str, config: Config, run: RunRecord, fault_at: float, steps: int
) -> DrillResult:
    """A run that must have reached ``steps`` in one MLflow run, every step logged, no sample lost or
    counted twice."""
    logged = sorted({s for s, _ in run.step_log})
    continuous = logged == list(range(1, steps + 1))
    lost, doubled = sample_accounting(config, run.final, steps)
    wrong_kinds = kinds_differ(config, run, steps)
    wrong_rows = rows_differ(run)
    passed = (
        run.final.get("step") == steps
        and continuous
        and run.mlflow_runs == 1
        and lost == doubled == 0
        and not wrong_kinds
        and wrong_rows == 0
    )
    observed = (
        f"reached step {run.final.get('step')}/{steps}; {run.mlflow_runs} MLflow run, steps "
        f"{logged[0] if logged else '-'}..{logged[-1] if logged else '-'} continuous: {continuous}; "
        f"samples double-counted {doubled}; kind sequence differs at steps {wrong_kinds}; worker groups "
        f"started {len(run.of('train_start'))}, resumed at steps {run.resumed_at}"
    )
    return DrillResult(
        scenario,
        expected,
        observed,
        passed,
        steps_redone=redone_steps(run.step_log),
        rows_differ=wrong_rows,
        samples_lost=lost,
        recover_s=recovery_time(run.step_log, fault_at),
        details={
            "mlflow_runs": run.mlflow_runs,
            "doubled": doubled,
            "worker_groups": len(run.of("train_start")),
            "kinds_differ": wrong_kinds,
            "resumed_at": run.resumed_at,
        },
    )


def judge_restart(result: DrillResult, after_step: int) -> DrillResult:
    """A recovery that must have gone through a restart: a second worker group that resumed from a
    checkpoint at or after ``after_step``, and at least one step trained twice."""
    resumed = result.details["resumed_at"]
    restarted = result.details["worker_groups"] >= 2 and any(s >= after_step for s in resumed)
    result.passed = result.passed and restarted and (result.steps_redone or 0) >= 1
    return result


def format_table(results: list[DrillResult]) -> str:
    """The drill table (Markdown, so that it pastes into a note as is)."""

    def cell(value) -> str:
        return "-" if value is None else str(value).replace("|", "/")

    lines = [
        "| scenario | expected | observed | steps redone | samples lost | rows differ from unfaulted run "
        "| recover s | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = [r.scenario, r.expected, r.observed, r.steps_redone, r.samples_lost, r.rows_differ, r.recover_s]
        lines.append("| " + " | ".join(cell(v) for v in row) + f" | {'yes' if r.passed else 'NO'} |")
    passed = sum(r.passed for r in results)
    lines.append(f"\n{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)
