"""``python -m service`` (or ``sentiment-serve``): check the settings (flags over
``SENTIMENT_*`` variables; ``--help`` lists them), load and check the bundle, then serve it with
uvicorn. Anything that stops it before serving is one line on stderr and a non-zero exit:
2 for invalid settings, 3 for a bundle that cannot be served.

With ``SENTIMENT_PROCESSES`` > 1 this process becomes uvicorn's supervisor: it checks the bundle
(on the CPU: the processes hold the device), then starts that many processes on one socket,
each loading the model itself (``service.app:process_app``), restarts one that dies, replaces
them one by one on SIGHUP (each new one serving before the old one leaves: the model reload of
this mode), and on SIGTERM lets each drain as a single process does."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import allocator

if TYPE_CHECKING:
    from service.config import Settings
    from service.runtime import ModelRuntime
    from service.scheduler import Policy

EXIT_SETTINGS = 2
EXIT_BUNDLE = 3

log = logging.getLogger("service")


def main(args: Sequence[str] | None = None, policy: Policy | None = None) -> int:
    """Serve with the settings the flags in ``args`` (default: the command line's) and the
    environment give, under ``policy`` (a ``scheduler.Policy``; default: the measured levers).
    ``python -m bench.serve`` passes others."""
    args = sys.argv[1:] if args is None else list(args)
    # SIGHUP's default action ends the process, and a rollout may send it to one still
    # starting: ignored from here (across the exec below too) until it is noted, then
    # handled by the lifespan as a reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Next: it may restart this process on jemalloc, so the first process should not pay for
    # importing torch (the imports below are here, not at the top, for that reason).
    allocator.exec_on_jemalloc(allocator_flag=_flag_value(args, "--allocator"))

    from service import reload
    from service.app import configure_logging

    settings = _settings(args)
    if settings is None:
        return EXIT_SETTINGS
    configure_logging(settings)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.request_during_start())
    allocator.report(settings.allocator)
    if not _grpc_port_free(settings):
        return EXIT_SETTINGS
    runtime = _checked_bundle(settings)
    if runtime is None:
        return EXIT_BUNDLE
    if settings.processes == 1:
        import uvicorn

        from service.app import create_app

        uvicorn.run(create_app(settings, runtime, policy), **uvicorn_options(settings))
        return 0
    if policy is not None:
        print("error: a benchmark's policy reaches one process only", file=sys.stderr)
        return EXIT_SETTINGS
    del runtime
    _serve_processes(settings)
    return 0


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag value`` or ``--flag=value``; the last one wins),
    read before the settings can be (they import torch)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.partition("=")[2]
    return value


def _settings(args: Sequence[str]) -> Settings | None:
    """The settings, or None with the reason on stderr (one line). What the flags set is put
    in the environment too, where the processes of ``processes`` > 1 read it."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.config import Settings, as_environment, command_line

    try:
        flags = command_line(args)
        settings = Settings(_cli_settings_source=flags)
    except SettingsError as exc:  # argparse's message: an unknown or malformed flag
        reason = str(exc).removeprefix("error parsing CLI: ")
        print(f"error: {reason} (--help lists the flags)", file=sys.stderr)
        return None
    except ValidationError as exc:
        problems = "; ".join(map(_problem, exc.errors()))
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return None
    os.environ.update(as_environment(flags()))
    return settings


def _problem(error: Any) -> str:
    """One validation error as the operator reads it: the flag and the variable, then what is
    wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # a check across settings names its variables itself
    name = "_".join(map(str, error["loc"]))
    return f"--{name.replace('_', '-')} / SENTIMENT_{name.upper()}: {message}"


def _grpc_port_free(settings: Settings) -> bool:
    """Whether the gRPC service can bind its port (as it will: shared with the service's own
    processes, SO_REUSEPORT), checked before the model loads; else False with the reason on
    stderr. gRPC's own failure comes later, as a traceback in the lifespan."""
    if settings.grpc_port <= 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((settings.host, settings.grpc_port))
        except OSError as exc:
            print(
                f"error: cannot serve gRPC on {settings.host}:{settings.grpc_port}: "
                f"{exc.strerror} (--grpc-port / SENTIMENT_GRPC_PORT; -1: no gRPC)",
                file=sys.stderr,
            )
            return False
    return True


def _checked_bundle(settings: Settings) -> ModelRuntime | None:
    """The default bundle loaded as it will serve (the others named by ``models`` checked on
    the CPU), or None with the reason on stderr. With several processes it is checked here on
    the CPU (the precision the processes will serve where that is the CPU too); each process
    then loads the models on its device."""
    from service.bundle import BundleError, resolve_device
    from service.runtime import ModelRuntime

    try:
        on_cpu = resolve_device(settings.device).type == "cpu"
        names: dict[str, list[Path]] = {}
        for more in settings.bundle_dirs[1:]:  # each loaded and let go: the lifespan loads it
            card = ModelRuntime.load(more, "cpu", settings.dtype if on_cpu else "float32").card
            names.setdefault(card.name, []).append(more)
        if settings.processes > 1:
            dtype = settings.dtype if on_cpu else "float32"
            runtime = settings.runtime if on_cpu else "torchscript"
            default = ModelRuntime.load(settings.bundle_dir, "cpu", dtype, runtime)
        else:
            default = ModelRuntime.load(
                settings.bundle_dir, settings.device, settings.dtype, settings.runtime
            )
        names.setdefault(default.card.name, []).append(settings.bundle_dir)
        for name, folders in names.items():
            if len(folders) > 1:
                raise BundleError(f"{', '.join(map(str, folders))} are all named {name!r}")
        return default
    except BundleError as exc:
        print(f"error: cannot serve: {exc}", file=sys.stderr)
        return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the settings, with the connections' bounds (``connections``). On
    SIGTERM uvicorn stops accepting connections and waits for the requests in flight (each
    bounded by its deadline); then the lifespan stops the batcher, which answers what it
    holds."""
    from service.connections import uvicorn_guards
    from service.logs import logging_config

    longest_deadline_s = max(settings.request_timeout_s, settings.explain_timeout_s)
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level, settings.log_format),
        "timeout_graceful_shutdown": int(longest_deadline_s) + 5,
        "timeout_keep_alive": settings.keep_alive_s,
        **uvicorn_guards(settings.max_connections, settings.read_timeout_s),
    }


def _serve_processes(settings: Settings) -> None:
    """uvicorn as the supervisor of ``settings.processes`` processes on one socket. One
    process is the default: the batcher can only merge requests it sees."""
    import uvicorn

    metrics_dir = tempfile.mkdtemp(prefix="sentiment-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the processes' imports
    try:
        uvicorn.run(
            "service.app:process_app",
            factory=True,
            workers=settings.processes,
            # A process answers uvicorn's health pings from a thread; loading a model onto a
            # GPU can hold it off for seconds, which must not count as hung.
            timeout_worker_healthcheck=120,
            **uvicorn_options(settings),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
