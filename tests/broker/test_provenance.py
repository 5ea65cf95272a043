"""
The provenance ledger: every buffered byte keeps its tier, however bytes are
taken, given back or dropped, and the per-tier level adds up.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.provenance import NO_TIER, Ledger, Tier, majority_tier, stat_key


def test_take_reports_the_runs_it_crosses() -> None:
    """
    Bytes taken from the front come with the tiers they were added with, in
    order, and leave the per-tier level.
    """
    ledger = Ledger()
    ledger.append(1, 32)
    ledger.append(1, 32)
    ledger.append(2, 32)
    assert [(1, 10)] == ledger.take(10)
    assert [(1, 54), (2, 6)] == ledger.take(60)
    assert {2: 26} == ledger.level_by_tier
    assert [] == ledger.take(0)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["append", "take", "back", "drop"]),
            st.sampled_from([None, 0, 1, 2]),
            st.integers(0, 100),
        ),
        max_size=40,
    )
)
def test_ledger_matches_a_byte_by_byte_model(
    steps: list[tuple[str, Tier, int]],
) -> None:
    """
    Against a list holding each byte's tier: takes, give-backs and drops
    report and keep exactly the model's tiers.
    """
    ledger = Ledger()
    model: list[Tier] = []
    for op, tier, size in steps:
        if op == "append" and size:
            ledger.append(tier, size)
            model += [tier] * size
        elif op in ("take", "back"):
            size = min(size, len(model))
            runs = ledger.take(size)
            expanded = [t for t, n in runs for _ in range(n)]
            assert model[:size] == expanded
            if op == "back":
                ledger.prepend(runs)
            else:
                del model[:size]
        elif op == "drop":
            size = min(size, len(model))
            ledger.drop_tail(size)
            del model[len(model) - size :]
        counts: dict[Tier, int] = {}
        for t in model:
            counts[t] = counts.get(t, 0) + 1
        assert counts == ledger.level_by_tier


def test_majority_tier_and_ties() -> None:
    """
    Most credit wins; a tie goes to the lower tier; no tier loses ties.
    """
    assert 3 == majority_tier({0: 10, 3: 30})
    assert 1 == majority_tier({2: 5, 1: 5})
    assert 4 == majority_tier({None: 5, 4: 5})
    assert majority_tier({}) is None
    assert NO_TIER == stat_key(None)
    assert 2 == stat_key(2)
