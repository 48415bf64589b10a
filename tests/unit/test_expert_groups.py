"""Expert groups that follow the engine tier: bookkeeping, the budget, config refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from maverick_serve.autoscaling.budget import fit_gpu_budget
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.experts.groups import GroupBook


def test_engines_fill_groups_then_start_new_ones_and_the_last_to_leave_stops_its_group() -> None:
    book = GroupBook("x", engines_per_group=2, lease_s=30)
    a, _ = book.join("a", 0)
    b, _ = book.join("b", 0)
    c, emptied = book.join("c", 0)
    assert (a, b, c, emptied) == ("x-g0.1", "x-g0.1", "x-g1.2", [])
    assert book.join("a", 1)[0] == a  # joining again keeps the member's group
    assert book.leave("a", 2) == []  # b still uses g0
    assert book.leave("b", 2) == ["x-g0.1"]
    assert book.join("d", 3)[0] == c  # room beside c: no new group
    # The freed slot is taken again, under a new generation: never a dying group's actor names.
    assert book.join("e", 3)[0] == "x-g0.3"
    assert book.snapshot() == {"x-g0.3": ["e"], "x-g1.2": ["c", "d"]}


def test_a_member_that_stops_renewing_is_dropped_and_its_group_stopped() -> None:
    book = GroupBook("x", engines_per_group=1, lease_s=10)
    g_a, _ = book.join("a", 0)
    g_b, _ = book.join("b", 0)
    assert book.renew("a", 8) is True  # a lives on; b died without leaving
    assert book.reap(9) == []
    assert book.reap(11) == [g_b]
    assert book.renew("b", 12) is False  # b must join again
    assert book.snapshot() == {g_a: ["a"]}
    assert book.join("e", 30)[1] == [g_a]  # a lapsed too: reaped on the next join


def test_budget_counts_whole_groups_of_expert_workers_with_the_engines() -> None:
    # Engines cost 1, each group of 2 engines brings 2 expert workers of 1: 3 engines = 3 + 4.
    groups = {"engine": (2, 2.0)}
    assert fit_gpu_budget(
        {"engine": 3}, {"engine": 1}, {"engine": 1.0}, {"engine": 1}, 7, group_costs=groups
    ) == {"engine": 3}
    # 6 units hold 2 engines (2 + 2) but not a third (3 + 4 = 7).
    assert fit_gpu_budget(
        {"engine": 3}, {"engine": 1}, {"engine": 1.0}, {"engine": 1}, 6, group_costs=groups
    ) == {"engine": 2}
    # Without the groups the same budget would have allowed 3 engines.
    assert fit_gpu_budget({"engine": 3}, {"engine": 1}, {"engine": 1.0}, {"engine": 1}, 6) == {"engine": 3}


def _cluster(**experts: object) -> dict[str, object]:
    gpu = {"custom_resources": {"fake_gpu": 1}}
    return {
        "experts": {
            "mode": "disaggregated",
            "ep_degree": 2,
            "worker_custom_resources": {"fake_gpu": 1},
            **experts,
        },
        "engine": {"separate_process": False},
        "resources": {"engine": gpu},
        "autoscaling": {
            "enabled": True,
            "budget_resource": "fake_gpu",
            "gpu_budget": 7,
            "engine": {"min_replicas": 2, "max_replicas": 4},
        },
    }


def test_following_groups_move_the_expert_workers_from_fixed_units_to_the_engine_tier() -> None:
    shared = ClusterConfig.model_validate(_cluster())
    assert shared.fixed_scaling_units() == 2 and shared.scaling_group_costs() == {}
    following = ClusterConfig.model_validate(_cluster(engines_per_group=1))
    assert following.fixed_scaling_units() == 0
    assert following.scaling_group_costs() == {"engine": (1, 2.0)}


def test_a_budget_that_cannot_hold_the_minimum_engines_groups_is_refused() -> None:
    cfg = _cluster(engines_per_group=1)
    cfg["autoscaling"]["gpu_budget"] = 5  # type: ignore[index]
    with pytest.raises(ValidationError, match=r"engine 2 x 1, expert workers 4 = 6"):
        ClusterConfig.model_validate(cfg)


@pytest.mark.parametrize(
    "transport", [{"type": "nccl", "backend": "gloo"}, {"type": "ray", "compiled": True}]
)
def test_transports_bound_to_one_engine_take_one_engine_per_group(transport: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="use engines_per_group: 1"):
        ClusterConfig.model_validate(_cluster(engines_per_group=2, transport=transport))
    ok = ClusterConfig.model_validate(_cluster(engines_per_group=1, transport=transport))
    assert ok.experts.engines_per_group == 1


def test_prefill_replicas_join_groups_too_and_the_budget_counts_theirs() -> None:
    cfg = _cluster(engines_per_group=1)
    cfg["kvtier"] = {"store": {"type": "redis"}}
    cfg["disaggregation"] = {"enabled": True, "prefill": {"custom_resources": {"fake_gpu": 1}}}
    cfg["autoscaling"]["gpu_budget"] = 20  # type: ignore[index]
    config = ClusterConfig.model_validate(cfg)
    assert config.scaling_group_costs() == {"engine": (1, 2.0), "prefill": (1, 2.0)}


def test_budget_and_fit_count_a_group_per_replica_after_scale_down_and_packed_groups_at_start() -> None:
    from maverick_serve.serving.builder import required_resources

    config = ClusterConfig.model_validate(_cluster(engines_per_group=2))
    # Groups are not repacked when replicas leave: 2 replicas may hold 2 half-empty groups.
    assert config.scaling_group_costs() == {"engine": (1, 2.0)}
    book = GroupBook("x", engines_per_group=2, lease_s=30)
    for member in "abcd":
        book.join(member, 0)
    book.leave("b", 1)
    book.leave("c", 1)
    assert len(book.snapshot()) == 2  # the case the budget must hold
    resources = {"engine": {"replicas": 3}, "check_cluster_fit": False}
    start = ClusterConfig.model_validate({**_cluster(engines_per_group=2), "resources": resources})
    shared = ClusterConfig.model_validate({**_cluster(), "resources": resources})
    # 3 engine replicas packed 2 per group at start: 2 groups of 2 workers (1 CPU each), not 1.
    assert required_resources(start)["CPU"] - required_resources(shared)["CPU"] == 2.0


def test_a_restarted_registry_never_hands_out_a_live_groups_name() -> None:
    from maverick_serve.experts.groups import registry_name

    first = GroupBook("x", 1, 30, token="aaaaaa")
    second = GroupBook("x", 1, 30, token="bbbbbb")  # the registry started again: generations restart
    assert first.join("m", 0)[0] != second.join("n", 0)[0]
    assert registry_name("x", 1, 30, 2) != registry_name("x", 2, 30, 2)  # new settings, new registry
