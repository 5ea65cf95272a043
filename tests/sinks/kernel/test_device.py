"""
The random driver for real: RNDADDENTROPY, RNDRESEEDCRNG and RNDGETENTCNT on
this machine's /dev/random (as root: CI runs as root), and the refusal to
start without CAP_SYS_ADMIN.

The calls are harmless on a ready kernel of the new generation: mixed input
only adds to the pool, credit is ignored after ready, and a reseed is what
the kernel does every minute anyway. On a classic kernel the credited call
would raise the count by at most 8 bits of honest os.urandom output.
"""

import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sinks.kernel.device import (
    IOCTLS,
    NO_CAPABILITY,
    POOLSIZE,
    RandomDevice,
    crng_ready,
    detect_semantics,
)
from sinks.kernel.wire import Semantics, rand_pool_info

REPO = Path(__file__).parents[3]
ENTROPY_AVAIL = Path("/proc/sys/kernel/random/entropy_avail")

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="feeding the kernel needs root (CI runs as root)"
)


def entropy_avail() -> int:
    return int(ENTROPY_AVAIL.read_text())


def raw_ioctl(fd: int, request: int, argument: bytes | None) -> tuple[int, int]:
    """
    ioctl(2) through libc, not fcntl.ioctl: its own return value and errno.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    buffer = None if argument is None else ctypes.create_string_buffer(argument)
    result = int(libc.ioctl(fd, request, buffer))
    return result, ctypes.get_errno() if result < 0 else 0


@pytest.fixture
def device() -> Iterator[RandomDevice]:
    device = RandomDevice(detect_semantics())
    yield device
    device.close()


@pytest.fixture
def random_fd() -> Iterator[int]:
    fd = os.open("/dev/random", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def test_this_kernel_has_a_known_generation() -> None:
    """
    poolsize reads 4096 or 256 here, and the readiness probe answers.
    """
    assert detect_semantics(POOLSIZE) in (Semantics.CLASSIC, Semantics.NEW)
    assert isinstance(crng_ready(), bool)


@as_root
def test_uncredited_add_returns_zero(random_fd: int) -> None:
    """
    RNDADDENTROPY with 0 credit and 64 bytes inline returns 0.
    """
    argument = rand_pool_info(0, os.urandom(64))
    assert (0, 0) == raw_ioctl(random_fd, IOCTLS.add_entropy, argument)


@as_root
def test_credited_add_returns_zero_and_is_ignored_once_ready(random_fd: int) -> None:
    """
    RNDADDENTROPY crediting 256 bits returns 0; on a ready new kernel
    entropy_avail stays at 256 (credit counts only before ready).
    """
    before = entropy_avail()
    argument = rand_pool_info(256, os.urandom(64))
    assert (0, 0) == raw_ioctl(random_fd, IOCTLS.add_entropy, argument)
    if detect_semantics() is Semantics.NEW and crng_ready():
        assert (256, 256) == (before, entropy_avail())


@as_root
def test_negative_credit_is_refused_with_einval(random_fd: int) -> None:
    """
    A negative count is EINVAL (the layout check in `rand_pool_info` refuses
    it before the kernel would).
    """
    argument = struct.pack("ii", -8, 8) + bytes(8)
    assert (-1, errno.EINVAL) == raw_ioctl(random_fd, IOCTLS.add_entropy, argument)
    with pytest.raises(ValueError, match="outside"):
        rand_pool_info(-8, bytes(8))


@as_root
def test_reseed_returns_zero_once_ready(random_fd: int) -> None:
    """
    RNDRESEEDCRNG returns 0 on a ready kernel (ENODATA before ready).
    """
    expected = (0, 0) if crng_ready() else (-1, errno.ENODATA)
    assert expected == raw_ioctl(random_fd, IOCTLS.reseed_crng, None)


@as_root
def test_device_reads_the_count_and_feeds_the_kernel(device: RandomDevice) -> None:
    """
    The sink's own device: RNDGETENTCNT agrees with entropy_avail, an add and
    a reseed go through, and on a ready new kernel the count stays 256.
    """
    state = device.state()
    assert state.ready == crng_ready()
    if device.semantics is Semantics.NEW and state.ready:
        assert 256 == state.entropy == entropy_avail()
    device.add(os.urandom(64), 256, "test")
    device.add(os.urandom(64), 0, "test")
    device.reseed("test")
    if device.semantics is Semantics.NEW and state.ready:
        assert 256 == device.state().entropy
    # POLLOUT means something only to a classic kernel.
    assert (device.pollable_fd() is None) == (device.semantics is Semantics.NEW)


@as_root
def test_device_refuses_a_bad_credit_before_the_kernel_sees_it(
    device: RandomDevice,
) -> None:
    """
    More than 8 bits per byte never reaches the ioctl.
    """
    with pytest.raises(ValueError, match="outside"):
        device.add(bytes(8), 65, "test")


def without_cap_sys_admin() -> list[str]:
    """
    The command prefix that runs a program without CAP_SYS_ADMIN: as root,
    setpriv drops it from the bounding and inheritable sets, so the program
    never gets it; as any other user it has none to begin with.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not on PATH")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-sys_admin", "--"]


def test_device_without_cap_sys_admin_says_what_to_do() -> None:
    """
    Opened without CAP_SYS_ADMIN, the device raises a BrokerError saying to
    run as root or grant the capability.
    """
    code = textwrap.dedent(
        """
        from broker.errors import BrokerError
        from sinks.kernel.device import RandomDevice, detect_semantics
        try:
            RandomDevice(detect_semantics())
        except BrokerError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [*without_cap_sys_admin(), sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (NO_CAPABILITY, "") == (result.stdout.strip(), result.stderr)


def test_broker_without_cap_sys_admin_exits_at_start(tmp_path: Path) -> None:
    """
    ``ebroker serve`` with a kernel sink and no CAP_SYS_ADMIN exits non-zero
    at start with one line on stderr that names the capability and the fix.
    """
    config = tmp_path / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            state_dir = "{tmp_path / "state"}"
            pool_size = "4 KiB"
            low_watermark = "0 B"
            drain = "0 s"

            [logging]
            level = "error"
            format = "json"

            [[sources]]
            name = "getrandom"
            kind = "getrandom"

            [[sinks]]
            kind = "kernel"
            """
        )
    )
    result = subprocess.run(
        [
            *without_cap_sys_admin(),
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(config),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert 0 != result.returncode
    assert 1 == len(lines), result.stderr
    assert "CAP_SYS_ADMIN" in lines[0]
    assert "run ebroker as root" in lines[0]
    assert "AmbientCapabilities=CAP_SYS_ADMIN" in lines[0]


@as_root
def test_unprivileged_user_with_ambient_cap_sys_admin_feeds_the_kernel() -> None:
    """
    What the agent's unit sets up (a dynamic user, CAP_SYS_ADMIN as the only
    capability, ambient, no new privileges), here with user nobody: the
    broker starts, feeds the real kernel and reseeds it.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not on PATH")
    # pytest's own temporary directories are root's alone: nobody needs one
    # it can reach.
    with tempfile.TemporaryDirectory(prefix="ebroker-agent-") as name:
        directory = Path(name)
        directory.chmod(0o777)
        fed = run_as_nobody(setpriv, directory)
    reason = "start" if crng_ready() else "seed"
    assert [reason] == [entry.get("reason") for entry in fed]


def run_as_nobody(setpriv: str, tmp_path: Path) -> list[dict[str, object]]:
    """
    Run the broker with a kernel sink as nobody with ambient CAP_SYS_ADMIN
    until its first kernel_fed line, and return the lines read up to it.
    """
    config = tmp_path / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            state_dir = "{tmp_path / "state"}"
            pool_size = "4 KiB"
            low_watermark = "0 B"
            drain = "0 s"

            [logging]
            format = "json"

            [[sources]]
            name = "getrandom"
            kind = "getrandom"

            [[sinks]]
            kind = "kernel"
            """
        )
    )
    config.chmod(0o644)
    process = subprocess.Popen(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+sys_admin",
            "--ambient-caps=-all,+sys_admin",
            "--bounding-set=-all,+sys_admin",
            "--no-new-privs",
            "--",
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(config),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if '"kernel_fed"' in line:
                return [json.loads(line)]
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()
    raise AssertionError("the broker never fed the kernel:\n" + "".join(lines))
