"""
The ``ebroker`` command line.

Errors are one clear line on stderr and a non-zero exit status, never a
traceback.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import uvloop

from broker import __version__
from broker.config import Config, load_config
from broker.errors import BrokerError, ConfigError
from broker.logging import configure_logging
from sources.entropykey.config import DEFAULT_KEYRING, EntropyKeySourceConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
RELOAD_WAIT = 10.0
"""Seconds `ebroker reload` waits for the broker to say how the reload went."""

OPERATOR_URL = "http://127.0.0.1:8890"
"""Where the shipped configs put the operator-plane HTTP sink (status, metrics)."""
KEY_BUSY_WORDS = (
    "reset by peer",
    "connection lost",
    "broken pipe",
    "closed the connection",
    "busy",
    "cannot claim",
)
"""What a transport says when something else holds the key (the simulator and
ekey-ulusbd close a second client; the USB claim fails with EBUSY)."""
DEFAULT_CONFIG = Path("/etc/ebroker/ebroker.toml")
"""Where the packaged systemd unit's broker reads its configuration."""
WATCH_INTERVAL = 2.0
"""Seconds between redraws of `ebroker status --watch`."""

STATUS_HELP = """\
Show a running broker's status: health and phase, the pool, each source, the
sinks, the budget store and the customers.

The first line and the exit status follow the Nagios/Icinga plugin rules:
  0 OK        healthy and serving
  1 WARNING   degraded (only a fallback tier feeds the pool, the budget store is
              unreachable, a configured source cannot run), starting, draining
              or closing, a source quarantined, stalled or failed, or a
              customer at 90 % of its quota or more
  2 CRITICAL  unhealthy: no healthy source and the pool below its low watermark
  3 UNKNOWN   no broker answered at --url, or not with a status document
--nagios prints only that line, with performance data after '|'. Colour only on
a terminal, and never when NO_COLOR is set."""

log = structlog.get_logger("ebroker.cli")


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"ebroker: {message}", file=sys.stderr)
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebroker",
        description="High-availability entropy broker: hardware RNGs in, "
        "EGD and HTTP out.",
    )
    parser.add_argument("--version", action="version", version=f"ebroker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument(
        "--config", "-c", type=Path, required=True, help="configuration file (TOML)"
    )
    serve.add_argument(
        "--takeover",
        action="store_true",
        help="take the listeners and EGD connections over from the broker running "
        "on the same state_dir, so no client sees the restart (starts normally "
        "when none runs)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file, and what the broker would refuse here "
        "(keyring permissions, device and state paths)",
    )
    check.add_argument("config", type=Path, help="configuration file (TOML)")

    status = commands.add_parser(
        "status",
        help="show a running broker's status (exit 0 OK, 1 WARNING, 2 CRITICAL, "
        "3 UNKNOWN, as a Nagios/Icinga plugin)",
        description=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--url",
        default=OPERATOR_URL,
        help="base URL of the broker's operator-plane HTTP sink",
    )
    shape = status.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the raw JSON")
    shape.add_argument(
        "--nagios",
        action="store_true",
        help="print only the plugin line, with performance data",
    )
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=WATCH_INTERVAL,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {WATCH_INTERVAL:g}) until Ctrl-C",
    )

    keys = commands.add_parser("keys", help="list Entropy Keys and their state")
    keys.add_argument(
        "--keyring",
        type=Path,
        help="keyring file (default: the running broker's, else the one in "
        f"--config, else {DEFAULT_KEYRING})",
    )
    keys.add_argument(
        "--config",
        "-c",
        type=Path,
        help=f"read the keyring path from this configuration (default "
        f"{DEFAULT_CONFIG} when it exists)",
    )
    keys.add_argument(
        "--url",
        default=OPERATOR_URL,
        help="a running broker's operator-plane HTTP sink to ask for key states "
        "('' to skip)",
    )

    rekey = commands.add_parser(
        "rekey", help="set a key's long-term key (master key read from stdin)"
    )
    rekey.add_argument("--serial", required=True, help="the key's 16-character serial")
    rekey.add_argument(
        "--keyring", type=Path, default=DEFAULT_KEYRING, help="keyring file"
    )
    rekey.add_argument("--transport", choices=["usb", "tty", "unix"], default="usb")
    rekey.add_argument("--path", type=Path, help="device or socket path (tty, unix)")
    rekey.add_argument(
        "--url",
        default=OPERATOR_URL,
        help="a running broker to ask whether it holds the key ('' to skip)",
    )

    reload = commands.add_parser(
        "reload", help="make a running broker re-read its customers and limits"
    )
    reload.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var"),
        help="the broker's state_dir: the broker holding its lock gets SIGHUP, and "
        "the exit status says whether it took the file",
    )
    reload.add_argument("--url", help="or ask over HTTP: the broker's base URL")
    reload.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin token (with --url)",
    )

    commands.add_parser(
        "hash-token",
        help="read a bearer token on stdin, print the sha256: form for the config",
    )

    simulate = commands.add_parser(
        "simulate-key", help="serve a simulated Entropy Key on a Unix socket"
    )
    simulate.add_argument("--serial", required=True, help="serial from the keyring")
    simulate.add_argument("--keyring", type=Path, required=True, help="keyring file")
    simulate.add_argument("--socket", type=Path, required=True, help="socket to create")
    simulate.add_argument(
        "--rate", type=float, default=4000.0, help="entropy bytes per second"
    )
    simulate.add_argument(
        "--master-key-file",
        type=Path,
        help="file holding the master key, so `ebroker rekey` can be tried",
    )
    return parser


def _install_signal_handlers(stop: asyncio.Event, hurry: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    signals = 0

    def handle_exit(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            log.info("signal_received", signal=name, action="drain, then stop")
            stop.set()
        elif signals == 2:
            log.info("signal_received", signal=name, action="stop now")
            hurry.set()
        elif signum == signal.SIGINT:
            # A third Ctrl-C: the operator will not wait even for the close.
            raise SystemExit(130)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle_exit, signum)


async def _serve(config: Config, config_path: Path, takeover: bool) -> None:
    from broker.app import serve

    stop = asyncio.Event()
    hurry = asyncio.Event()
    _install_signal_handlers(stop, hurry)
    await serve(config, stop, config_path=config_path, hurry=hurry, takeover=takeover)


def _unreadable(config_path: Path) -> str | None:
    """
    Why the configuration file cannot be read, naming it and the fix; None
    when it can (or is absent, which `load_config` reports itself).
    """
    from broker.ownership import file_problem

    try:
        with config_path.open("rb"):
            return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return file_problem(exc, config_path, "config file", access="read")


def cmd_serve(config_path: Path, takeover: bool = False) -> int:
    problem = _unreadable(config_path)
    if problem is not None:
        return _fail(f"cannot start: {problem}")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    configure_logging(config.logging.level, config.logging.format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config, config_path, takeover))
    except BrokerError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def cmd_check_config(config_path: Path) -> int:
    from broker.preflight import check

    problem = _unreadable(config_path)
    if problem is not None:
        return _fail(problem)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    findings = check(config)
    for finding in findings:
        prefix = "" if finding.error else "note: "
        print(f"{prefix}{finding}", file=sys.stderr)
    if any(finding.error for finding in findings):
        return EXIT_FAILURE
    sources = ", ".join(source.name for source in config.enabled_sources)
    sinks = ", ".join(
        f"{sink.kind} on {' '.join(str(a) for a in sink.listen)}"
        if sink.listen
        else sink.kind
        for sink in config.sinks
    )
    print(f"{config_path}: ok (sources: {sources}; sinks: {sinks})")
    return EXIT_OK


class StatusUnavailable(Exception):
    """
    A running broker's status could not be read; the message says why.
    """


def _read_status(url: str) -> dict[str, Any]:
    """
    ``GET URL/v1/status`` of a running broker.

    Raises:
        ValueError: ``url`` is not an http(s) URL.
        StatusUnavailable: no broker answered with a status document.
    """
    target = url.rstrip("/") + "/v1/status"
    if not target.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    try:
        with urllib.request.urlopen(target, timeout=5) as response:  # noqa: S310 - scheme checked above
            document = json.load(response)
    except urllib.error.HTTPError as exc:
        raise StatusUnavailable(f"{target} answered {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        why = reason.strerror if isinstance(reason, OSError) else None
        raise StatusUnavailable(
            f"no broker answered at {url} ({(why or str(reason)).lower()}): is it "
            "running, and is --url its operator-plane HTTP sink?"
        ) from exc
    except (OSError, ValueError) as exc:
        raise StatusUnavailable(f"cannot read {target}: {exc}") from exc
    if not isinstance(document, dict):
        raise StatusUnavailable(f"{target} did not answer with a status document")
    if "sources" not in document:
        # A tenant-plane sink answers only the asker's own customer.
        raise StatusUnavailable(
            f"{target} gave a tenant's view only: point --url at the broker's "
            'operator-plane HTTP sink (plane = "operator")'
        )
    return document


def _colour_wanted() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _status_frame(
    url: str, shape: str, previous: dict[str, Any] | None
) -> tuple[int, str, dict[str, Any] | None]:
    """
    One reading of the broker: the exit status, the text to print and the
    document (None when there was none).
    """
    from broker.status_table import Verdict, perfdata, render, verdict

    try:
        document = _read_status(url)
        assessment = verdict(document)
    except (ValueError, StatusUnavailable) as exc:
        return Verdict.UNKNOWN, f"EBROKER UNKNOWN - {exc}", None
    if shape == "json":
        return assessment.verdict, json.dumps(document, indent=2), document
    if shape == "nagios":
        return assessment.verdict, assessment.plugin_line(perfdata(document)), document
    out_rate = _recent_output_rate(url)
    if previous is not None:
        elapsed = float(document.get("time", 0)) - float(previous.get("time", 0))
        served = int(document.get("pool", {}).get("bytes_out", 0)) - int(
            previous.get("pool", {}).get("bytes_out", 0)
        )
        if elapsed > 0 and served >= 0:
            out_rate = served / elapsed
    text = render(document, assessment, colour=_colour_wanted(), out_rate=out_rate)
    return assessment.verdict, text, document


def _recent_output_rate(url: str) -> float | None:
    """
    The pool's output rate at the newest point of the broker's history
    (``/v1/history``), or None when it keeps none or has no point yet.
    """
    target = url.rstrip("/") + "/v1/history?last=30"
    try:
        with urllib.request.urlopen(target, timeout=5) as response:  # noqa: S310 - _read_status checked the scheme
            history = json.load(response)
        rates = history["pool"]["out_bytes_per_s"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None
    known = [rate for rate in rates if isinstance(rate, int | float)]
    return float(known[-1]) if known else None


def cmd_status(url: str, shape: str, watch: float | None = None) -> int:
    """
    Print the broker's status once (exit status as a monitoring plugin), or
    every ``watch`` seconds until Ctrl-C (exit 0).
    """
    if watch is None:
        code, text, _ = _status_frame(url, shape, None)
        print(text)
        return code
    if watch <= 0:
        return _fail("--watch needs a positive number of seconds", EXIT_USAGE)
    clear = sys.stdout.isatty()
    previous: dict[str, Any] | None = None
    try:
        while True:
            _, text, document = _status_frame(url, shape, previous)
            previous = document or previous
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text + ("" if clear else "\n"), flush=True)
            time.sleep(watch)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: not an error.
        return EXIT_OK


def _fetch_status(url: str) -> dict[str, Any] | None:
    """
    `_read_status`, or None when there is no URL or no answer (the caller
    carries on without the broker's view).
    """
    if not url:
        return None
    try:
        return _read_status(url)
    except (ValueError, StatusUnavailable):
        return None


def _config_keyrings(config_path: Path) -> list[Path]:
    """
    The keyrings of a configuration's Entropy Key sources.

    Raises:
        ConfigError: the file cannot be read or is not a valid configuration.
    """
    config = load_config(config_path)
    keyrings = [
        source.keyring
        for source in config.sources
        if isinstance(source, EntropyKeySourceConfig)
    ]
    return list(dict.fromkeys(keyrings))


def _pick_keyring(
    keyring: Path | None, config_path: Path | None, status: dict[str, Any] | None
) -> tuple[Path, str]:
    """
    The keyring ``ebroker keys`` reads and where that choice came from:
    ``--keyring``, then ``--config``, then the running broker's Entropy Key
    sources, then the systemd unit's configuration, then the default path.

    Raises:
        ConfigError: ``--config`` names a file that is not a valid configuration.
    """
    if keyring is not None:
        return keyring, "--keyring"
    if config_path is not None:
        found = _config_keyrings(config_path)
        if found:
            return found[0], f"from {config_path}"
    for source in (status or {}).get("sources", []):
        details = source.get("details") or {}
        if source.get("kind") == "entropykey" and details.get("keyring"):
            return Path(details["keyring"]), "the running broker's"
    config_seen = ((status or {}).get("config") or {}).get("path")
    candidates = [Path(config_seen)] if config_seen else []
    if config_path is None:
        candidates.append(DEFAULT_CONFIG)
    for candidate in candidates:
        try:
            found = _config_keyrings(candidate)
        except ConfigError:
            continue
        if found:
            return found[0], f"from {candidate}"
    return DEFAULT_KEYRING, "default"


def cmd_keys(keyring: Path | None, url: str, config_path: Path | None = None) -> int:
    from sources.entropykey.cli import format_rows, list_keys

    status = _fetch_status(url)
    try:
        chosen, origin = _pick_keyring(keyring, config_path, status)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    print(f"keyring {chosen} ({origin})")
    rows, warnings = list_keys(chosen, status)
    for warning in warnings:
        print(f"ebroker: warning: {warning}", file=sys.stderr)
    if url and status is None:
        print(
            f"ebroker: note: no broker answered at {url}; states unknown",
            file=sys.stderr,
        )
    if not rows:
        print("no Entropy Keys found")
        return EXIT_OK
    print(format_rows(rows))
    return EXIT_OK


def _broker_holding(serial: str, url: str) -> str | None:
    """
    Which running broker drives the key ``serial``, as words for the operator
    ("the broker (pid 1234)"), or None when none answering at ``url`` does.
    """
    status = _fetch_status(url)
    if status is None:
        return None
    held = any(
        source.get("kind") == "entropykey"
        and (source.get("details") or {}).get("serial") == serial
        and source.get("state") != "stopped"
        for source in status.get("sources", [])
    )
    if not held:
        return None
    pid = _broker_pid(status)
    return f"the broker (pid {pid})" if pid is not None else f"the broker at {url}"


def _broker_pid(status: dict[str, Any]) -> int | None:
    from broker.ownership import holder

    config_path = (status.get("config") or {}).get("path")
    if not config_path:
        return None
    try:
        config = load_config(Path(config_path))
    except ConfigError:
        return None
    return holder(config.broker.state_dir)


def cmd_rekey(
    serial: str, keyring: Path, transport: str, path: Path | None, url: str = ""
) -> int:
    from sources.entropykey.cli import read_master_key, rekey, rekey_transport
    from sources.entropykey.keyring import KeyringError
    from sources.entropykey.rekey import RekeyError

    holding = _broker_holding(serial, url)
    if holding is not None:
        return _fail(
            f"{holding} holds key {serial}: stop it first (systemctl stop ebroker) "
            "and run rekey again"
        )
    try:
        master_key = read_master_key()
        link = rekey_transport(serial, transport, path)
        print(rekey(serial, keyring, master_key, link))
    except (KeyringError, RekeyError, ValueError) as exc:
        hint = ""
        if isinstance(exc, RekeyError) and any(
            word in str(exc).lower() for word in KEY_BUSY_WORDS
        ):
            hint = (
                "; if a broker (or ekeyd) drives this key, stop it first "
                "(systemctl stop ebroker) and run rekey again"
            )
        return _fail(f"rekey failed, keyring unchanged: {exc}{hint}")
    return EXIT_OK


def cmd_simulate_key(
    serial: str,
    keyring: Path,
    socket_path: Path,
    rate: float,
    master_key_file: Path | None,
) -> int:
    from sources.entropykey.keyring import KeyringError, parse_master_key
    from sources.entropykey.sim.key import SimulatedKey
    from sources.entropykey.sim.unix_server import serve_unix

    try:
        master_key = (
            parse_master_key(master_key_file.read_text()) if master_key_file else None
        )
        key = SimulatedKey.from_keyring(
            keyring, serial, rate=rate, master_key=master_key
        )
    except (KeyringError, OSError, ValueError) as exc:
        return _fail(str(exc))
    configure_logging("info", "console")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"simulated key {serial} on unix:{socket_path}", file=sys.stderr)
        await serve_unix(key, socket_path, stop=stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        return _fail(f"cannot serve on {socket_path}: {exc.strerror or exc}")
    return EXIT_OK


def cmd_reload(state_dir: Path, url: str | None, token_file: Path | None) -> int:
    if url:
        if token_file is None:
            return _fail("--url needs --admin-token-file", EXIT_USAGE)
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            return _fail(f"cannot read {token_file}: {exc.strerror}")
        target = url.rstrip("/") + "/v1/admin/reload"
        if not target.startswith(("http://", "https://")):
            return _fail(f"{url!r} is not an http:// or https:// URL", EXIT_USAGE)
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            target, method="POST", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                json.load(response)
        except urllib.error.HTTPError as exc:
            return _fail(f"reload refused ({exc.code}); see the broker's log")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return _fail(f"cannot reach {target}: {exc}")
        print("reloaded")
        return EXIT_OK
    return _reload_by_signal(state_dir)


def _reload_by_signal(state_dir: Path) -> int:
    # Only a pid that holds the state directory's lock is a broker: a stale
    # pid file may name a pid reused by anything else.
    from broker.app import RELOAD_FILE
    from broker.ownership import holder

    pid = holder(state_dir)
    if pid is None:
        return _fail(f"no running broker holds {state_dir}; is this its state_dir?")
    outcome_file = state_dir / RELOAD_FILE
    before = _reload_outcome(outcome_file, pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _fail(f"cannot signal the broker (pid {pid}): {exc.strerror or exc}")
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        outcome = _reload_outcome(outcome_file, pid)
        if outcome is not None and outcome.get("sequence") != (before or {}).get(
            "sequence"
        ):
            if outcome.get("accepted"):
                print(f"reloaded (pid {pid})")
                return EXIT_OK
            return _fail(f"reload refused: {outcome.get('reason')}")
        time.sleep(0.05)
    return _fail(
        f"sent SIGHUP to {pid}, but it reported no outcome in {RELOAD_WAIT:g} s"
    )


def _reload_outcome(path: Path, pid: int) -> dict[str, Any] | None:
    try:
        outcome = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(outcome, dict) or outcome.get("pid") != pid:
        return None
    return outcome


def cmd_hash_token() -> int:
    from broker.accounts import hash_token

    token = sys.stdin.readline().strip()
    if not token:
        return _fail("no token on stdin", EXIT_USAGE)
    print(hash_token(token))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args.config, args.takeover)
        if args.command == "check-config":
            return cmd_check_config(args.config)
        if args.command == "status":
            shape = "json" if args.json else "nagios" if args.nagios else "table"
            return cmd_status(args.url, shape, args.watch)
        if args.command == "keys":
            return cmd_keys(args.keyring, args.url, args.config)
        if args.command == "rekey":
            return cmd_rekey(
                args.serial, args.keyring, args.transport, args.path, args.url
            )
        if args.command == "reload":
            return cmd_reload(args.state_dir, args.url, args.admin_token_file)
        if args.command == "hash-token":
            return cmd_hash_token()
        if args.command == "simulate-key":
            return cmd_simulate_key(
                args.serial, args.keyring, args.socket, args.rate, args.master_key_file
            )
    except BrokenPipeError:
        # The reader went away (`ebroker status | head`): nothing left to say
        # to it. Point stdout at /dev/null so the exit's flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, never a traceback
        return _fail(f"internal error: {exc!r}")
    parser.print_help(sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
