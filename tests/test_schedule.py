import pytest

from asyncgen.schedule import AsyncSchedule, StepKind, Task, Topology


def test_topology_places_last_stage_on_stride_ranks():
    top = Topology(stages=3, stride=2)
    assert top.world_size == 4
    assert [top.stage_of(r) for r in range(4)] == [0, 1, 2, 2]
    assert [top.replica_of(r) for r in range(4)] == [0, 0, 0, 1]
    assert top.ranks_of(2) == [2, 3] and top.ranks_of(0) == [0]


def test_kinds_with_warmup_and_stride():
    s = AsyncSchedule(Topology(2, 2), warmup=2)
    assert [s.kind(i).value for i in range(7)] == ["exact", "exact", "round", "cached", "round", "cached", "round"]
    assert s.round_start(5) == 4


def test_warmup_zero_still_runs_one_exact_step_when_split():
    assert AsyncSchedule(Topology(2), warmup=0).exact_steps == 1
    assert AsyncSchedule(Topology(1, 2), warmup=0).exact_steps == 0  # nothing stale to wait for


def test_round_tasks_stride_1_and_time_shift():
    s = AsyncSchedule(Topology(3), warmup=1, time_shift=True)
    assert s.round_tasks(4, 10) == [
        Task(0, 0, True, 4, None),
        Task(1, 0, False, 3, None),
        Task(2, 0, False, 3, 4),
    ]


def test_round_tasks_stride_2_truncated_at_the_end():
    s = AsyncSchedule(Topology(2, 2), warmup=1)
    assert s.round_tasks(5, 7) == [Task(0, 0, True, 5, None), Task(1, 0, False, 5, 5), Task(1, 1, False, 6, 6)]
    assert s.round_tasks(7, 8) == [Task(0, 0, True, 7, None), Task(1, 0, False, 7, 7)]
    assert s.is_last_round(7, 8) and not s.is_last_round(5, 8)


def test_every_step_gets_exactly_one_prediction():
    for stages, stride, warmup, total in [(2, 1, 1, 9), (3, 2, 2, 10), (1, 2, 0, 5), (2, 2, 3, 8)]:
        s = AsyncSchedule(Topology(stages, stride), warmup)
        predicted = []
        for i in range(total):
            kind = s.kind(i)
            if kind is StepKind.EXACT:
                predicted.append(i)
            elif kind is StepKind.ROUND:
                predicted += [t.out_step for t in s.round_tasks(i, total) if t.out_step is not None]
        assert predicted == list(range(total))


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages=0), "stages must be a positive integer"),
    (dict(stages=2, stride=0), "stride must be a positive integer"),
])
def test_bad_topology(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology(**kwargs)


def test_negative_warmup():
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        AsyncSchedule(Topology(2), warmup=-1)
