"""`whisperd [--config FILE]`: load the config, set up logging, run the daemon on uvloop in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from whisperd import __version__
from whisperd import protocol as p
from whisperd.config import load_config
from whisperd.daemon import Daemon
from whisperd.errors import WhisperdError
from whisperd.gpuprobe import NvmlProbe
from whisperd.handlers import Handlers
from whisperd.metrics import build_registries
from whisperd.metrics_http import MetricsServer
from whisperd.server import ControlServer, bind_socket
from whisperd.store import Store

log = logging.getLogger("whisperd")
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


async def serve(config_path: Path | None, log_level: str | None) -> int:
    config = load_config(config_path)
    setup_logging(log_level or config.daemon.log_level)
    state_dir = Path(config.daemon.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    store = Store(state_dir)
    daemon = Daemon(config, store, NvmlProbe(exclude=frozenset(config.gpu.exclude)))
    daemon.install_signal_handlers()
    gpu_registry, system_registry, events = build_registries(daemon)
    daemon.tick_observer = events.tick.observe
    daemon.oom_observer = lambda device: events.oom.labels(device.removeprefix("cuda:")).inc()
    metrics = MetricsServer({"/metrics": system_registry, "/metrics/gpu": gpu_registry})
    server = ControlServer(
        Handlers(daemon),
        daemon.watchers,
        lambda: [p.DeviceSnapshot(devices=daemon.device_views()), p.SystemSnapshot(stats=daemon.stats())],
        config.daemon.max_request_bytes,
    )
    socket_path = Path(config.daemon.socket_path)
    sock = bind_socket(socket_path, config.daemon.socket_mode)  # refuses if another daemon answers there
    try:
        if config.metrics.enabled:
            await metrics.start(config.metrics.listen)
        await daemon.start()
        await server.start(sock)
        log.info("whisperd %s ready on %s (state in %s)", __version__, socket_path, state_dir)
        await daemon.run_until_stopped()
        await server.stop_accepting()
        await daemon.drain(config.daemon.drain_timeout_s)
    finally:
        await metrics.close()
        await server.close()
        store.close()
        socket_path.unlink(missing_ok=True)
    log.info("whisperd stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whisperd", description="Whisper transcription daemon")
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("WHISPERD_CONFIG") or None,
        help="TOML configuration (default: built-in defaults; see etc/whisperd.toml)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"whisperd {__version__}")
    args = parser.parse_args(argv)
    try:
        import uvloop

        return uvloop.run(serve(args.config, args.log_level))
    except WhisperdError as exc:
        print(f"whisperd: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG if exc.code == "bad_config" else EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
