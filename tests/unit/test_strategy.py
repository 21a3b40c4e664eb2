import pytest

from switchover.errors import UsageError
from switchover.strategy import batch_count, plan_batches

H = [f"web{i}" for i in range(1, 11)]


def test_all_is_one_batch():
    assert plan_batches("all", H) == [list(range(10))]


def test_rolling_batches_cover_every_host_once_in_order():
    assert plan_batches("rolling", H[:5], 2) == [[0, 1], [2, 3], [4]]
    assert plan_batches("rolling", H[:3]) == [[0], [1], [2]]
    assert plan_batches("rolling", H, "25%") == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_percentages_round_up_to_at_least_one():
    assert batch_count("1%", 3) == 1
    assert batch_count("100%", 7) == 7
    assert batch_count(50, 3) == 50


def test_canary_by_count_and_by_name():
    assert plan_batches("canary", H[:4]) == [[0], [1, 2, 3]]
    assert plan_batches("canary", H[:4], canary_hosts=2) == [[0, 1], [2, 3]]
    assert plan_batches("canary", H[:4], canary_hosts=["web3"]) == [[2], [0, 1, 3]]
    assert plan_batches("canary", H[:1]) == [[0]]
    with pytest.raises(UsageError, match="web9"):
        plan_batches("canary", H[:3], canary_hosts=["web9"])


def test_empty_and_unknown():
    assert plan_batches("all", []) == []
    with pytest.raises(UsageError):
        plan_batches("blue-green", H)
