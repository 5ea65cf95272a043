"""
The kernel sink's schedule, without I/O: what it writes, when, and with what
credit, on each kernel generation. Time is a number the tests move.
"""

import pytest

from sinks.kernel.plan import (
    FeedPlan,
    KernelState,
    PlanSettings,
    Reason,
    Write,
    credit_bits,
)
from sinks.kernel.record import classic_credit
from sinks.kernel.wire import Semantics

SETTINGS = PlanSettings()
NOT_READY = KernelState(ready=False, entropy=0)
READY = KernelState(ready=True, entropy=256)


def new_plan(now: float = 0.0, settings: PlanSettings = SETTINGS) -> FeedPlan:
    return FeedPlan(settings, Semantics.NEW, now)


def classic_plan(now: float = 0.0, settings: PlanSettings = SETTINGS) -> FeedPlan:
    return FeedPlan(settings, Semantics.CLASSIC, now)


def writes_between(
    plan: FeedPlan, start: float, end: float, state: KernelState, step: float = 0.5
) -> list[tuple[float, Write]]:
    """
    Look at the kernel every ``step`` seconds and make every write due.
    """
    made = []
    now = start
    while now <= end:
        write = plan.due(now, state)
        if write is not None:
            plan.wrote(now, write, state)
            made.append((now, write))
        now += step
    return made


# ---- credit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "per_byte", "bits"),
    [
        (64, 4.0, 256),
        (64, 8.0, 512),
        (64, 9.0, 512),
        (64, 0.0, 0),
        (64, -1.0, 0),
        (3, 2.5, 7),
        (0, 8.0, 0),
    ],
)
def test_credit_is_whole_bits_at_most_8_per_byte(
    nbytes: int, per_byte: float, bits: int
) -> None:
    """
    Credit rounds down, never exceeds 8 bits per byte, never goes negative.
    """
    assert bits == credit_bits(nbytes, per_byte)


def test_seed_grows_when_credit_per_byte_is_low() -> None:
    """
    At 1 bit per byte the boot seed is 256 bytes, so it still credits 256 bits.
    """
    assert 256 == PlanSettings(credit=1.0).seed_nbytes
    assert 64 == PlanSettings(credit=4.0).seed_nbytes
    assert 64 == PlanSettings(credit=0.0).seed_nbytes


# ---- new kernels ---------------------------------------------------------------------


def test_new_kernel_not_ready_gets_a_credited_seed_first() -> None:
    """
    Before the CRNG is ready the first write is a seed of 64 bytes credited
    with 256 bits, without RNDRESEEDCRNG (which fails before ready).
    """
    write = new_plan().due(0.0, NOT_READY)
    assert Write(64, 4.0, False, Reason.SEED) == write
    assert write is not None
    assert 256 == write.credit_for(64)


def test_new_kernel_after_ready_is_never_credited() -> None:
    """
    The seed that made the kernel ready counts as the start write; from then
    on every write has 0 credit and a reseed, once per reseed interval.
    """
    plan = new_plan()
    seed = plan.due(0.0, NOT_READY)
    assert seed is not None
    plan.wrote(0.0, seed, NOT_READY)
    made = writes_between(plan, 0.5, 200.0, READY)
    assert [60.0, 120.0, 180.0] == [now for now, _ in made]
    assert all(
        (0, True, Reason.PERIODIC) == (w.credit_for(w.nbytes), w.reseed, w.reason)
        for _, w in made
    )


def test_new_kernel_ready_at_start_gets_an_uncredited_reseed_at_once() -> None:
    """
    A kernel already ready when the agent starts (RDRAND, a bootloader seed)
    gets fresh outside input at once, uncredited, then every interval.
    """
    plan = new_plan()
    made = writes_between(plan, 0.0, 130.0, READY)
    assert [(0.0, Reason.START), (60.0, Reason.PERIODIC), (120.0, Reason.PERIODIC)] == [
        (now, w.reason) for now, w in made
    ]
    assert {0} == {w.credit_for(w.nbytes) for _, w in made}


def test_seed_that_did_not_make_the_kernel_ready_waits_before_the_next() -> None:
    """
    If the kernel is still not ready after a seed, the next seed comes no
    sooner than check_interval later: the pool is not drained in a loop.
    """
    plan = new_plan()
    made = writes_between(plan, 0.0, 3.0, NOT_READY, step=0.25)
    assert [0.0, 1.0, 2.0, 3.0] == [now for now, _ in made]
    assert {Reason.SEED} == {w.reason for _, w in made}


def test_vm_generation_change_reseeds_at_once() -> None:
    """
    A NEW_VMGENID uevent makes an uncredited write with reseed due now; the
    next periodic one is a full interval after it.
    """
    plan = new_plan()
    writes_between(plan, 0.0, 10.0, READY)
    plan.vm_generation_changed(25.0)
    assert plan.get_timer() <= 25.0  # due now: the driver does not sleep
    write = plan.due(25.0, READY)
    assert Write(64, 0.0, True, Reason.VMGENID) == write
    plan.wrote(25.0, write, READY)
    assert 85.0 == plan.get_timer()
    assert plan.due(84.0, READY) is None
    assert Reason.PERIODIC == getattr(plan.due(85.0, READY), "reason", None)


def test_vm_generation_change_overrides_a_starved_pause() -> None:
    """
    Waiting out an empty pool does not delay the reaction to a clone.
    """
    plan = new_plan()
    plan.due(0.0, READY)
    plan.starved(0.0)
    assert plan.due(0.5, READY) is None
    plan.vm_generation_changed(0.5)
    assert Reason.VMGENID == getattr(plan.due(0.5, READY), "reason", None)


def test_timer_of_a_ready_new_kernel_is_the_next_reseed() -> None:
    """
    Between reseeds the driver sleeps until the next one; it does not poll.
    """
    plan = new_plan()
    write = plan.due(0.0, READY)
    assert write is not None
    plan.wrote(0.0, write, READY)
    assert plan.due(1.0, READY) is None
    assert 60.0 == plan.get_timer()
    assert not plan.wants_pollout()


# ---- an empty pool ----------------------------------------------------------------


@pytest.mark.parametrize("semantics", list(Semantics))
def test_empty_pool_is_retried_once_per_check_interval(semantics: Semantics) -> None:
    """
    A write the pool cannot fill is retried after check_interval, never
    before: an agent whose brokers are unreachable does not spin.
    """
    plan = FeedPlan(SETTINGS, semantics, 0.0)
    attempts = []
    looks = 0
    now = 0.0
    while now < 10.0:
        looks += 1
        if plan.due(now, NOT_READY) is not None:
            attempts.append(now)
            plan.starved(now)
        # The driver sleeps until the plan's timer; it must lie ahead.
        timer = plan.get_timer()
        assert timer > now
        now = timer
    assert [float(second) for second in range(10)] == attempts
    assert looks <= 20


def test_refused_write_is_retried_after_check_interval() -> None:
    """
    A write the kernel refused is not repeated at once.
    """
    plan = new_plan()
    assert plan.due(0.0, READY) is not None
    plan.failed(0.0)
    assert plan.due(0.9, READY) is None
    assert plan.due(1.0, READY) is not None


# ---- classic kernels ---------------------------------------------------------------


def test_classic_kernel_above_the_watermark_is_left_alone() -> None:
    """
    At or above 1024 bits nothing is written.
    """
    plan = classic_plan()
    assert plan.due(0.0, KernelState(True, 1024)) is None
    assert plan.due(1.0, KernelState(True, 3000)) is None


def test_classic_kernel_is_topped_up_from_below_the_watermark_to_target() -> None:
    """
    Below the watermark a burst of credited writes runs, each followed by a
    look at the count, until the count reaches the target; the asymptotic
    credit of a classic kernel gets there in a bounded number of writes.
    """
    plan = classic_plan()
    count = 100
    writes = []
    for _ in range(200):
        state = KernelState(True, count)
        write = plan.due(0.0, state)
        if write is None:
            break
        assert (Reason.TOP_UP, False) == (write.reason, write.reseed)
        plan.wrote(0.0, write, state)
        writes.append(write)
        count = classic_credit(count, write.credit_for(write.nbytes))
    assert count >= SETTINGS.target
    assert 10 < len(writes) < 60
    assert {256} == {w.credit_for(w.nbytes) for w in writes}


def test_classic_burst_ends_when_the_kernel_takes_no_credit() -> None:
    """
    A write that did not raise the count ends the burst: the next write
    comes only after check_interval, one per interval at most.
    """
    plan = classic_plan()
    stuck = KernelState(True, 500)
    made = writes_between(plan, 0.0, 5.0, stuck, step=0.1)
    assert len(made) <= 6
    assert {Reason.TOP_UP} == {w.reason for _, w in made}


def test_classic_pollout_wakeup_is_not_rearmed_until_the_timer() -> None:
    """
    POLLOUT that found nothing to do (the kernel's threshold is above our
    watermark) is not armed again until check_interval has passed.
    """
    plan = classic_plan()
    state = KernelState(True, 1500)
    assert plan.due(0.0, state) is None
    assert plan.wants_pollout()
    plan.pollout_woke(0.1)
    assert plan.due(0.1, state) is None
    assert not plan.wants_pollout()
    assert 1.1 == pytest.approx(plan.get_timer())
    assert plan.due(1.1, state) is None
    assert plan.wants_pollout()


def test_classic_pollout_wakeup_below_the_watermark_tops_up() -> None:
    """
    POLLOUT is how a classic kernel says it wants input: the look after it
    starts a top-up.
    """
    plan = classic_plan()
    assert plan.due(0.0, KernelState(True, 2000)) is None
    plan.pollout_woke(0.3)
    write = plan.due(0.3, KernelState(True, 800))
    assert write is not None
    assert Reason.TOP_UP == write.reason


def test_classic_kernel_reseeds_on_a_vm_generation_change() -> None:
    """
    The VM generation write is uncredited with a reseed on classic kernels too.
    """
    plan = classic_plan()
    plan.vm_generation_changed(3.0)
    assert Write(64, 0.0, True, Reason.VMGENID) == plan.due(
        3.0, KernelState(True, 3000)
    )


def test_seed_is_revised_to_an_uncredited_start_once_ready() -> None:
    """
    A seed chosen before ready but written after goes uncredited with a
    reseed; other writes are left as they are.
    """
    plan = new_plan()
    seed = plan.due(0.0, NOT_READY)
    assert seed is not None
    assert Write(64, 0.0, True, Reason.START) == plan.revise(seed, READY)
    assert seed == plan.revise(seed, NOT_READY)
    top_up = Write(64, 4.0, False, Reason.TOP_UP)
    assert top_up == plan.revise(top_up, READY)
