import pytest

from asyncgen.schedules.asyncdiff import AsyncSchedule, StepKind, Task, Topology, connections


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


# ------------------------------------------------------------------ connections


@pytest.mark.parametrize("stages, stride, cfg_parts, expected", [
    # stride 1: a chain of states, the last stage's predictions to everyone
    (3, 1, 1, [("prediction", 0, 2), ("prediction", 1, 2), ("state", 0, 1), ("state", 1, 2)]),
    # stride 2: stage 0 feeds both replicas of the last stage; each replica tells every other rank
    (2, 2, 1, [("prediction", 0, 1), ("prediction", 0, 2), ("prediction", 1, 2), ("state", 0, 1), ("state", 0, 2)]),
    # CFG parallel: two parts of two ranks; states stay inside a part, predictions cross parts
    (2, 1, 2, [("prediction", 0, 1), ("prediction", 0, 3), ("prediction", 1, 2), ("prediction", 1, 3),
               ("prediction", 2, 3), ("state", 0, 1), ("state", 2, 3)]),
    # one stage: nothing but predictions, from the single rank of a part to the other part's
    (1, 1, 2, [("prediction", 0, 1)]),
    (1, 1, 1, []),
])
def test_connections_by_hand(stages, stride, cfg_parts, expected):
    assert connections(Topology(stages, stride), cfg_parts) == expected


def _messages(schedule: AsyncSchedule, total: int, cfg_parts: int) -> set[tuple[str, int, int]]:
    """Every (channel, sender, receiver) of a whole call, from the schedule's tasks, as the runtime sends them."""
    top, m = schedule.topology, schedule.topology.world_size
    sent = set()
    for step in range(total):
        kind = schedule.kind(step)
        if kind is StepKind.CACHED:
            continue
        if kind is StepKind.EXACT:
            tasks = [Task(k, 0, k == 0, step, step if k == top.last else None) for k in range(top.stages)]
        else:
            tasks = schedule.round_tasks(step, total)
        for part in range(cfg_parts):
            base = part * m
            for t in tasks:
                src = base + top.rank_of(t.stage, t.replica)
                if t.out_step is None:
                    if kind is StepKind.EXACT or not schedule.is_last_round(step, total):
                        sent |= {("state", src, base + dst) for dst in top.ranks_of(t.stage + 1)}
                else:
                    sent |= {("prediction", src, dst) for dst in range(cfg_parts * m) if dst != src}
    return sent


@pytest.mark.parametrize("stages, stride, cfg_parts", [(2, 1, 1), (3, 1, 1), (4, 1, 1), (2, 2, 1), (3, 2, 1),
                                                       (2, 1, 2), (2, 2, 2), (3, 1, 2), (1, 2, 1)])
@pytest.mark.parametrize("warmup, time_shift", [(1, False), (2, True)])
def test_connections_cover_every_message_of_a_call(stages, stride, cfg_parts, warmup, time_shift):
    """Every pair a call sends on is connected up front, and no pair is connected for nothing."""
    schedule = AsyncSchedule(Topology(stages, stride), warmup, time_shift)
    pairs = connections(schedule.topology, cfg_parts)
    used = {(c, min(a, b), max(a, b)) for c, a, b in _messages(schedule, 9, cfg_parts)}
    assert used == set(pairs)
    assert pairs == sorted(pairs) and len(pairs) == len(set(pairs))  # one order, the same on every rank


def test_connections_reject_a_bad_cfg_parts():
    with pytest.raises(ValueError, match="cfg_parts must be a positive integer, got 0"):
        connections(Topology(2), 0)
