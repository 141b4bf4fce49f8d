"""database.split_by_size: the batches that bound what rekey and migrate-data hold."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from relay_server.store import database


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=100), max_size=50),
    limit=st.integers(min_value=1, max_value=150),
)
def test_runs_keep_the_order_and_stay_under_the_limit_but_for_a_big_one_alone(
    sizes: list[int], limit: int
) -> None:
    items = list(enumerate(sizes))
    runs = database.split_by_size(items, lambda item: item[1], limit)
    assert [item for run in runs for item in run] == items, "nothing lost, reordered or doubled"
    for run in runs:
        total = sum(n for _, n in run)
        assert total <= limit or len(run) == 1, f"{run} is over {limit} with company"
    for first, second in itertools.pairwise(runs):
        assert sum(n for _, n in first) + second[0][1] > limit, "a run was cut too early"
    assert (runs == [[]]) if not items else all(runs), "no empty run between others"
