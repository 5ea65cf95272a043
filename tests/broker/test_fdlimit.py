"""
The broker gives itself the file descriptors its connection caps need.
"""

import resource
from collections.abc import Iterator

import pytest

from broker.fdlimit import (
    RESERVED,
    FdBudget,
    needed_for,
    planned_soft_limit,
    raise_soft_limit,
)

INFINITY = resource.RLIM_INFINITY


def test_caps_and_reserve_add_up() -> None:
    """
    Two sinks at 1,024 connections each need 2,048 descriptors plus the reserve.
    """
    assert 2048 + RESERVED == needed_for([1024, 1024])


@pytest.mark.parametrize(
    ("soft", "hard", "needed", "planned"),
    [
        pytest.param(1024, 524288, 2304, 2304, id="systemd-default-raised"),
        pytest.param(1024, 2000, 2304, 2000, id="capped-by-hard-limit"),
        pytest.param(65536, 524288, 2304, 65536, id="never-lowered"),
        pytest.param(1024, INFINITY, 2304, 2304, id="infinite-hard"),
        pytest.param(INFINITY, INFINITY, 2304, INFINITY, id="infinite-soft"),
    ],
)
def test_planned_soft_limit(soft: int, hard: int, needed: int, planned: int) -> None:
    """
    The soft limit rises to what the caps need, within the hard limit, and
    never drops.
    """
    assert planned == planned_soft_limit(soft, hard, needed)


def test_budget_says_when_the_hard_limit_falls_short() -> None:
    """
    A budget whose soft limit is below the need is reported as not enough.
    """
    assert not FdBudget(needed=2304, soft=2000, hard=2000).enough
    assert FdBudget(needed=2304, soft=2304, hard=4096).enough


@pytest.fixture
def restore_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_process_limit_is_raised(restore_limit: tuple[int, int]) -> None:
    """
    Started with a low soft limit, the process raises its own.
    """
    _, hard = restore_limit
    wanted = 512 if hard == INFINITY else min(512, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    budget = raise_soft_limit(wanted)
    assert (wanted, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert wanted == budget.soft
