"""Command line: builds Settings once, dispatches to a subcommand, maps failures to exit codes.

Options live in config.py only; the CLI adds ``--config`` and ``--set section.field=value`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eyed.config import ConfigError, Settings, connect_endpoint, dump_settings, load_settings
from eyed.logs import install_excepthooks, print_error, setup_logging

if TYPE_CHECKING:
    from eyed.subscriber import Subscriber

logger = logging.getLogger(__name__)

# sysexits.h values, so systemd units and scripts can tell failures apart.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # model, source or endpoint cannot be set up (may work later: restart)
EXIT_CANTCREAT = 73  # an offline command's output cannot be written
EXIT_SOFTWARE = 70  # shutdown did not finish in time, or an internal error
EXIT_CONFIG = 78  # invalid configuration: a restart cannot help (RestartPreventExitStatus=78)
EXIT_TERMINATED = 128 + 15  # a command other than run ended by SIGTERM, its temporary files removed


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum`` (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a timeout in seconds, more than 0 and finite (ZeroMQ's poll waits for ever on a
    negative one and overflows on a huge one)."""
    from eyed.subscriber import MAX_TIMEOUT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 (exclusive) and {MAX_TIMEOUT_S} seconds")
    return value


def file_stem(text: str) -> str:
    """An argparse type: a file name without a folder (``eyed keys --name``)."""
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (no folders: use --output for those)")
    return text


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, built once per command."""
    if getattr(args, "settings", None) is None:
        args.settings = load_settings(args.config, args.set)
    return args.settings


# Where systemd hands the service its credentials (LoadCredential=): there only while the service runs.
CREDENTIALS_ROOT = Path("/run/credentials")


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    notes = check_files(settings)
    print(dump_settings(settings), end="")
    print(f"# source.id resolves to {settings.source.resolved_id()!r}", file=sys.stderr)
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    return EXIT_OK


def check_files(settings: Settings) -> list[str]:
    """Read the files the configuration names, with the daemon's own loaders, so that a file `eyed run` would
    refuse (exit 78) is refused here too; no model is loaded and nothing touches the network. Returns notes
    for the user."""
    from eyed.daemon import drift_reference
    from eyed.publisher import check_curve, ipc_socket_path

    drift_reference(settings)
    ipc_socket_path(settings.publish.endpoint)
    _check_priors(settings)
    notes = _check_providers(settings)
    key = settings.publish.curve_secret_key
    if key is not None and key.is_relative_to(CREDENTIALS_ROOT) and not key.exists():
        # Checked before the service's first start, the credential is not there yet; the daemon reads it then.
        return [*notes, "publish.curve_secret_key is a systemd credential, there once the service runs: not read"]
    clients = check_curve(settings.publish)
    return notes if clients is None else [*notes, f"publish.curve_clients allows {clients} subscriber key(s)"]


def _check_providers(settings: Settings) -> list[str]:
    """model.providers against the installed onnxruntime, by the rule `eyed run` applies (a missing provider is
    exit 78 there too); notes for the user."""
    if settings.model.backend != "onnx":
        return []
    try:
        import onnxruntime  # noqa: F401 (only whether it imports)
    except ImportError:
        return ["onnxruntime is not installed here: model.providers not checked (`eyed run` needs it)"]
    from eyed.model.onnx_backend import check_providers

    check_providers(settings.model.providers)
    return []


def _check_priors(settings: Settings) -> None:
    """A model.coarse_priors file, as the model reads it when its labels map to model.coarse."""
    model = settings.model
    if model.coarse == "none" or model.coarse_priors in ("builtin", "none"):
        return
    from eyed.model.labels import build_mapper, load_group_map

    # The model's labels are known only once it loads; the map's own labels are those the daemon reads it for.
    _, groups = load_group_map(model.coarse)
    build_mapper([label for members in groups.values() for label in members], model.coarse, model.coarse_priors)


def cmd_run(args: argparse.Namespace) -> int:
    from eyed.daemon import run

    settings = _settings(args)
    setup_logging(settings.log.level)
    return run(settings)


# Options of `eyed export` that mean something only with --int8.
INT8_OPTIONS = ("calibration", "check", "float_stem", "target_cpu")


def cmd_export(args: argparse.Namespace) -> int:
    from eyed.model.export import export_onnx

    int8_only = [f"--{name.replace('_', '-')}" for name in INT8_OPTIONS if getattr(args, name) not in (None, False)]
    if int8_only and not args.int8:
        args.parser.error(f"{', '.join(int8_only)}: only with --int8")
    settings = _settings(args)
    setup_logging(settings.log.level)
    if not args.int8:
        print(export_onnx(settings.model.id, args.output))
        return EXIT_OK
    from eyed.model.quantize import export_int8

    if settings.model.backend != "onnx":
        settings.model.backend = "onnx"
    given = {name: getattr(args, name) for name in INT8_OPTIONS if getattr(args, name) is not None}
    record = export_int8(settings, args.output, **given)
    print(json.dumps(record, indent=2))
    print(args.output)
    return EXIT_OK


def cmd_subscribe(args: argparse.Namespace) -> int:
    from eyed.subscriber import Subscriber

    endpoint = _connect_endpoint(args)
    received = 0
    with Subscriber(endpoint, tuple(args.topic) or ("",), _curve(args)) as sub, _malformed_said(sub, "subscribe"):
        while args.count == 0 or received < args.count:
            try:
                topic, payload = sub.receive(args.timeout)
            except TimeoutError as exc:
                print_error(f"eyed subscribe: {exc}")
                return EXIT_FAILURE
            received += 1
            if args.json:
                print(json.dumps({"topic": topic, **payload}), flush=True)
            else:
                print(_summary(topic, payload), flush=True)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when a heartbeat with state ``live`` arrives within the timeout, else 1."""
    from eyed.events import health_topic
    from eyed.subscriber import Subscriber

    endpoint = _connect_endpoint(args)
    # Two heartbeats' time and a margin: one missed heartbeat (a slow frame) is not yet a dead daemon.
    timeout = args.timeout if args.timeout is not None else 2 * _settings(args).publish.heartbeat_s + 2
    topic = health_topic(args.source) if args.source else "health."
    deadline = time.monotonic() + timeout
    with Subscriber(endpoint, (topic,), _curve(args)) as sub, _malformed_said(sub, "health"):
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                name, payload = sub.receive(remaining)
            except TimeoutError:
                break
            # A subscription is a prefix: health.door also lets in health.door2.
            if args.source and name != topic:
                continue
            print(_summary(name, payload), flush=True)
            if payload.get("state") == "live":
                return EXIT_OK
        problem = f": {sub.problem}" if sub.problem else ""
    print_error(f"eyed health: no live heartbeat on {endpoint} within {timeout:g} s{problem}")
    return EXIT_FAILURE


def _connect_endpoint(args: argparse.Namespace) -> str:
    """Where ``subscribe`` and ``health`` connect: --endpoint, or the one publish.endpoint binds."""
    name = "--endpoint" if args.endpoint else "publish.endpoint"
    endpoint = args.endpoint or _settings(args).publish.endpoint
    try:
        return connect_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"{name} {endpoint}: {exc}") from None


@contextlib.contextmanager
def _malformed_said(sub: Subscriber, command: str) -> Iterator[None]:
    """Says, at the end, how many messages on the endpoint were not events (skipped) and what the first was."""
    try:
        yield
    finally:
        if sub.malformed:
            print_error(
                f"eyed {command}: skipped {sub.malformed} message(s) that were not eyed events, "
                f"the first: {sub.first_malformed}"
            )


def _curve(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """(--curve-key, --server-key) for a daemon with CURVE on; both or neither."""
    if (args.curve_key is None) != (args.server_key is None):
        raise ConfigError("--curve-key and --server-key go together (this subscriber's secret, the daemon's public)")
    return None if args.curve_key is None else (args.curve_key, args.server_key)


def cmd_keys(args: argparse.Namespace) -> int:
    """Write a CURVE key pair: NAME.key (public, to hand out) and NAME.key_secret (0600, to keep)."""
    from eyed.curve import create_keys

    public, secret = create_keys(args.output, args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return EXIT_OK


# Characters that would act on a terminal rather than show: C0/C1 controls (a newline forging a second event's
# line, ANSI escape sequences), line and paragraph separators, and bidirectional overrides that reorder text.
TERMINAL_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _summary(topic: str, p: dict[str, Any]) -> str:
    """One line for an event; fields a payload lacks are left out (or ``?``), never a crash. Text from the wire
    (class names, source ids, anything a publisher sends) shows its control characters escaped."""
    kind = p.get("type")
    if kind == "label":
        coarse = p.get("coarse")
        extra = f" coarse={coarse.get('label')}:{_score(coarse.get('score'))}" if isinstance(coarse, dict) else ""
        truth = f" truth={p['truth']}" if p.get("truth") is not None else ""
        latency = f" {p['latency_ms']}ms" if "latency_ms" in p else ""
        line = f"{topic} seq={p.get('seq', '?')} {p.get('label', '?')}:{_score(p.get('score'))}{extra}{truth}{latency}"
    else:
        keys = ("state", "frames", "fps", "dropped", "errors")
        if kind == "drift":
            keys = ("status", "window", "n", "fired", "learning")
        line = " ".join([topic, *(f"{k}={p[k]}" for k in keys if k in p)])
    return TERMINAL_CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), line)


def _score(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "?"


def cmd_bench(args: argparse.Namespace) -> int:
    from eyed.bench import run_bench

    settings = _settings(args)
    setup_logging("WARNING")
    report = run_bench(
        settings,
        frames=args.frames,
        seed_frames=args.seed_frames,
        batch=args.batch,
        rounds=args.rounds,
        passes=args.passes,
        int8=args.int8,
        with_int8=not args.no_int8,
    )
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from eyed.evaluate import run_eval
    from eyed.outputs import figure_format

    settings = _settings(args)
    setup_logging("WARNING")
    if args.png is not None:
        figure_format(args.png)  # a missing matplotlib or an unknown format is said before the run, not after it
    vs = [[item for item in group.split(",") if item] for group in args.vs]
    report = run_eval(settings, skip=args.skip, vs=vs, png=args.png)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return EXIT_OK


def cmd_priors(args: argparse.Namespace) -> int:
    from eyed.evaluate import run_priors

    settings = _settings(args)
    setup_logging(settings.log.level)
    run_priors(settings, args.output)
    print(args.output)
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    from eyed.evaluate import run_profile

    settings = _settings(args)
    setup_logging(settings.log.level)
    report = run_profile(settings, args.output)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_drift_report(args: argparse.Namespace) -> int:
    from eyed.drift.reference import load_reference
    from eyed.drift.report import draw_report, read_drift_events
    from eyed.outputs import figure_format

    settings = _settings(args)
    setup_logging(settings.log.level)
    figure_format(args.output)  # a missing matplotlib or an unknown format is said before a run, not after it
    reference_path = args.reference or settings.drift.reference
    reference = None
    if reference_path is not None:
        settings.drift.reference = reference_path
        # Read first: a bad reference fails before a run of the source, as it does for the daemon.
        try:
            reference = load_reference(reference_path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.events is not None:
        try:
            events = read_drift_events(args.events)
        except OSError as exc:
            print_error(f"eyed drift-report: --events {args.events}: {exc.strerror or exc}")
            return EXIT_FAILURE
        except ValueError as exc:
            print_error(f"eyed drift-report: {exc}")
            return EXIT_FAILURE
    else:
        from eyed.evaluate import run_drift

        events = run_drift(settings)
        for event in events:
            print(json.dumps({"topic": f"drift.{event['source']}", **event}))
    if not events:
        print_error(f"eyed drift-report: no drift windows in {args.events or 'the run'}")
        return EXIT_FAILURE
    try:
        print(draw_report(events, args.output, reference, source=args.source), file=sys.stderr)
    except ValueError as exc:  # several sources and no --source, or none with that name
        print_error(f"eyed drift-report: {exc}")
        return EXIT_FAILURE
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from eyed.finetune import FinetuneOptions, run_finetune

    settings = _settings(args)
    if args.limit is not None:
        settings.source.limit = args.limit
    setup_logging(settings.log.level)
    opts = FinetuneOptions(
        output=args.output,
        epochs=args.epochs,
        weight_decay=args.weight_decay,
        val_fraction=args.val_fraction,
        flip=args.flip,
        seed=args.seed,
    )
    report = run_finetune(settings, opts)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def curve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-key", type=Path, help="CURVE: this subscriber's NAME.key_secret (from eyed keys)")
    p.add_argument("--server-key", type=Path, help="CURVE: the daemon's public NAME.key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eyed", description="Edge vision daemon: labels, never pixels.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one option (repeatable); beats the environment and the file",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str, writes: dict[str, bool] | None = None
    ) -> argparse.ArgumentParser:
        """A subcommand; ``writes`` names its output arguments (True for a folder), checked before it runs."""
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func, parser=p, writes=writes or {})
        return p

    add("run", cmd_run, "run the daemon")
    add("check-config", cmd_check_config, "validate the configuration and print the effective one")
    p = add("export", cmd_export, "export model.id to an ONNX file with labels and preprocessing", {"output": False})
    p.add_argument("--output", type=Path, required=True)
    p.add_argument(
        "--int8", action="store_true", help="static INT8 quantisation, calibrated on frames of the configured source"
    )
    p.add_argument(
        "--calibration", type=at_least(1), help="--int8: calibration frames, from source.skip on (default: 300)"
    )
    p.add_argument(
        "--check", type=at_least(0), help="--int8: frames after those for the accuracy check (0 = none; default: 500)"
    )
    p.add_argument(
        "--float-stem",
        action="store_true",
        help="--int8: keep the first three convolutions in float (slower; closer to FP32's fine class)",
    )
    p.add_argument(
        "--target-cpu",
        choices=["x86_64", "aarch64"],
        help="--int8: the CPU the file will run on (default: this machine's); tunes the first convolution's layout",
    )
    p = add("subscribe", cmd_subscribe, "print events from a running daemon")
    p.add_argument(
        "--endpoint", help="default: where publish.endpoint is reached on this machine (tcp://*:P: the loopback)"
    )
    p.add_argument("--topic", action="append", default=[], help="topic prefix (repeatable); default all")
    p.add_argument("--count", type=at_least(0), default=0, help="stop after this many events (0 = never)")
    p.add_argument("--timeout", type=seconds, default=30.0, help="give up after this many quiet seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    curve_arguments(p)
    p = add("health", cmd_health, "exit 0 if a live source's heartbeat arrives within --timeout, else 1")
    p.add_argument(
        "--endpoint", help="default: where publish.endpoint is reached on this machine (tcp://*:P: the loopback)"
    )
    p.add_argument("--source", help="only this source.id (default: any)")
    p.add_argument(
        "--timeout",
        type=seconds,
        help="seconds to wait (default: twice publish.heartbeat_s and 2 s: 12 s with heartbeats every 5 s)",
    )
    curve_arguments(p)
    p = add("keys", cmd_keys, "write a CURVE key pair for the daemon or a subscriber", {"output": True})
    p.add_argument("--output", type=Path, required=True, help="folder for NAME.key and NAME.key_secret")
    p.add_argument("--name", type=file_stem, default="eyed", help="file name stem (default: eyed)")
    p = add("bench", cmd_bench, "daemon path vs a bare onnxruntime loop vs the transformers loop, same frames")
    p.add_argument("--frames", type=at_least(1), default=200, help="frames decoded for the onnx measurements")
    p.add_argument("--passes", type=at_least(1), default=3, help="passes over the frames in each round")
    p.add_argument("--rounds", type=at_least(1), default=8, help="rounds in which the paths take turns")
    p.add_argument("--seed-frames", type=at_least(0), default=100, help="frames for the transformers loop (0 = skip)")
    p.add_argument("--batch", type=at_least(1), default=8, help="batch size for the batched daemon run (1 = skip)")
    p.add_argument("--int8", type=Path, help="INT8 file to compare (default: quantise model.onnx once into the cache)")
    p.add_argument("--no-int8", action="store_true", help="FP32 only")
    p.add_argument("--json", action="store_true")
    p = add("eval", cmd_eval, "accuracy of the configured model on a labelled replay source", {"png": False})
    p.add_argument("--skip", type=at_least(0), default=0, help="skip this many records first (e.g. 45000)")
    p.add_argument(
        "--vs",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE[,...]",
        help="also evaluate this variant of the model on the same frames, e.g. model.onnx=int8.onnx or "
        "model.id=finetuned/ (repeatable)",
    )
    p.add_argument("--png", type=Path, help="write the confusion matrices to this PNG")
    p.add_argument("--json", action="store_true")
    p = add(
        "finetune",
        cmd_finetune,
        "train a new head on source.dataset/split; save checkpoint + ONNX to --output",
        {"output": True},
    )
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--limit", type=at_least(0), help="training images (default: source.limit; 0 = all)")
    p.add_argument("--epochs", type=at_least(1), default=300, help="L-BFGS iterations on the cached features")
    p.add_argument("--weight-decay", type=float, default=3e-3)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out from training for validation")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip augmentation")
    p.add_argument("--seed", type=at_least(0), default=0)
    p = add(
        "profile",
        cmd_profile,
        "write a drift reference (and coarse priors) from the configured source",
        {"output": False},
    )
    p.add_argument("--output", type=Path, required=True)
    p = add(
        "drift-report",
        cmd_drift_report,
        "chart drift windows against their thresholds: recorded events (--events) or a run of the source",
        {"output": False},
    )
    p.add_argument("--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--events", type=Path, help="JSON lines from `eyed subscribe --json --topic drift.`")
    p.add_argument("--reference", type=Path, help="default: drift.reference")
    p.add_argument("--source", help="source id, when the events come from several")
    p = add(
        "priors",
        cmd_priors,
        "estimate coarse-label priors from the configured source (no labels used)",
        {"output": False},
    )
    p.add_argument("--output", type=Path, required=True)
    return parser


class Terminated(BaseException):
    """SIGTERM during a command other than ``run`` (``timeout``, ``kill``, a cancelled CI job). A BaseException,
    as KeyboardInterrupt is, so no ``except Exception`` swallows it on the way out."""


@contextlib.contextmanager
def _terminated_unwinds(wanted: bool) -> Iterator[None]:
    """While entered (if ``wanted``), SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: an export, a fine-tune or an evaluation unwinds and removes its temporary files and
    staging folders, which the default action (death by signal) left behind. The daemon has its own handlers,
    which only set a flag; these commands are single-threaded batch jobs with nothing to finish first."""
    if not wanted or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    # Run as the program (a caller passing argv, such as a test, keeps its own hooks): before anything can fail,
    # so that an uncaught exception is logged with a priority journald reads.
    if argv is None:
        install_excepthooks()
    from eyed.curve import CurveError
    from eyed.daemon import ShutdownTimeout
    from eyed.model import ModelLoadError
    from eyed.outputs import MissingExtra, OutputError, check_writable, made_folders_removed_on_failure
    from eyed.publisher import PublishError
    from eyed.sources import SourceError

    args = build_parser().parse_args(argv)
    try:
        with _terminated_unwinds(args.func is not cmd_run), contextlib.ExitStack() as outputs:
            # Before the run: an output that cannot be written fails now, not after minutes of work; but after
            # the configuration is read, so that a run refused for it leaves no folders behind. Nor does a run
            # refused or failed later: the folders made here go again while they are empty.
            if args.writes:
                _settings(args)
            for name, folder in args.writes.items():
                if (path := getattr(args, name)) is not None:
                    check_writable(path, folder=folder)
                    outputs.enter_context(made_folders_removed_on_failure(path))
            return int(args.func(args))
    except Terminated:
        return EXIT_TERMINATED
    except (ConfigError, CurveError) as exc:
        print_error(f"eyed: {exc}")
        return EXIT_CONFIG
    except (ModelLoadError, SourceError, PublishError, MissingExtra) as exc:
        print_error(f"eyed: {exc}")
        return EXIT_UNAVAILABLE
    except OutputError as exc:
        print_error(f"eyed: {exc}")
        return EXIT_CANTCREAT
    except ShutdownTimeout as exc:
        print_error(f"eyed: {exc}")
        if argv is None:  # the process is ours to end
            # A worker is still inside onnxruntime: the interpreter's teardown would free the session under it
            # and the C++ runtime abort (SIGABRT, a core dump) instead of this exit code. Nothing is left to
            # save: STOPPING=1 is out, the publisher has lingered, and the logs are flushed here.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_SOFTWARE)
        return EXIT_SOFTWARE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `eyed subscribe | head -1`: the reader has what it wanted. Python would fail again flushing stdout at
        # exit, unless stdout now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
