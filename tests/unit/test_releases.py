from datetime import UTC, datetime

from switchover.releases import analyze, is_release_id, new_release_id, select_prune

T = datetime(2026, 12, 31, 12, 0, 0, tzinfo=UTC)


def ev(event, release, previous=None):
    return {"event": event, "release": release, "previous": previous}


def test_new_release_id_is_utc_timestamp():
    assert new_release_id([], T) == "20261231_120000"


def test_same_second_gets_sortable_suffix():
    a = new_release_id([], T)
    b = new_release_id([a], T)
    c = new_release_id([a, b], T)
    ids = [a, b, c]
    assert ids == ["20261231_120000", "20261231_120000_02", "20261231_120000_03"]
    assert sorted(ids) == ids
    # ten and more still sort after nine
    many = [a]
    for _ in range(12):
        many.append(new_release_id(many, T))
    assert sorted(many) == many and len(set(many)) == 13


def test_clock_stepping_back_still_sorts_after_newest():
    newer = "20270101_000000"
    got = new_release_id([newer], T)
    assert got > newer and is_release_id(got)


def test_rollback_target_is_last_known_good_not_newest_dir():
    hist = [
        ev("deploy_succeeded", "20260101_000000"),
        ev("deploy_succeeded", "20260102_000000"),
        ev("deploy_failed", "20260103_000000"),  # failed: never a target
        ev("deploy_succeeded", "20260105_000000"),
    ]
    # 20260104 is on disk but was never activated
    disk = [
        "20260101_000000",
        "20260102_000000",
        "20260103_000000",
        "20260104_000000",
        "20260105_000000",
    ]
    s = analyze(hist, disk, "20260105_000000")
    assert s.previous == "20260102_000000"
    assert s.state_of("20260103_000000") == "failed"
    assert s.state_of("20260104_000000") == "available"
    assert s.state_of("20260105_000000") == "live"


def test_rollback_target_must_still_exist():
    hist = [
        ev("deploy_succeeded", "20260101_000000"),
        ev("deploy_succeeded", "20260102_000000"),
        ev("deploy_succeeded", "20260103_000000"),
    ]
    s = analyze(hist, ["20260101_000000", "20260103_000000"], "20260103_000000")
    assert s.previous == "20260101_000000"


def test_release_rolled_back_to_counts_as_good():
    hist = [ev("rolled_back", "20260101_000000")]
    s = analyze(hist, ["20260101_000000", "20260102_000000"], "20260102_000000")
    assert s.previous == "20260101_000000"


def test_no_history_means_no_target():
    s = analyze([], ["20260101_000000", "20260102_000000"], "20260102_000000")
    assert s.previous is None


def test_torn_or_foreign_entries_are_ignored():
    hist = [
        {"event": "deploy_succeeded"},
        {"release": 5},
        ev("deploy_succeeded", "20260101_000000"),
    ]
    s = analyze(hist, ["20260101_000000", "20260102_000000"], "20260102_000000")
    assert s.previous == "20260101_000000"


def test_prune_keeps_newest_healthy_and_protects_live_and_target():
    disk = [f"202601{d:02d}_000000" for d in range(1, 9)]
    hist = [ev("deploy_succeeded", disk[0])]
    hist += [ev("deploy_failed", r) for r in disk[1:7]]  # six failures in a row
    hist += [ev("deploy_succeeded", disk[7])]
    s = analyze(hist, disk, disk[7])
    assert s.previous == disk[0]
    pruned = select_prune(s, keep=2)
    # failed ones go, do not count toward keep, and the old good target survives
    assert sorted(pruned) == disk[1:7]


def test_prune_counts_only_healthy_releases():
    disk = [f"202601{d:02d}_000000" for d in range(1, 7)]
    hist = [ev("deploy_succeeded", r) for r in disk]
    s = analyze(hist, disk, disk[-1])
    assert select_prune(s, keep=3) == disk[:3]
    assert select_prune(s, keep=1) == disk[:4]  # live and previous always stay


def test_prune_protects_extra():
    disk = ["20260101_000000", "20260102_000000"]
    s = analyze([], disk, None)
    assert select_prune(s, keep=1, protect=["20260101_000000"]) == []
