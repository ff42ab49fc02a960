"""`whisperd [--config FILE]`: load the config, set up logging, run the daemon on uvloop in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from whisperd import __version__, systemd
from whisperd.app import App
from whisperd.config import load_config
from whisperd.errors import ConfigError, WhisperdError
from whisperd.gpuprobe import NvmlProbe
from whisperd.metrics_http import HttpServer, metrics_server
from whisperd.pg_audio import AudioCache
from whisperd.pg_retention import PgPruner
from whisperd.pg_store import PgStore
from whisperd.retention import SqlitePruner
from whisperd.server import ControlServer, bind_socket
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.statedir import StateDirLock, prepare_socket_dir, prepare_state_dir
from whisperd.store import Store
from whisperd.views import Views

log = logging.getLogger("whisperd")
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


class _StderrFormatter(logging.Formatter):
    """Readable lines; a record's structured fields (JOB_ID=..., as sent to the journal) at the end."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k.isupper() and v not in ("", None))
        return f"{line} [{fields}]" if fields else line


def setup_logging(level: str) -> None:
    """To the journal with structured fields when systemd connected stderr to it; readable lines otherwise."""
    handler = systemd.journal_handler() if systemd.under_journald() else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def read_password(path: str) -> str | None:
    """The job database's password from store.password_file (never a command line), which only the daemon's
    user may read; None without one (libpq's PGPASSWORD, ~/.pgpass, or no password)."""
    if not path:
        return None
    try:
        with open(path) as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError(f"store.password_file {path} is readable by others: chmod 600 it")
            return f.readline().rstrip("\n")
    except OSError as exc:
        raise ConfigError(f"cannot read store.password_file {path}: {exc.strerror}") from exc


def status_line(views: Views) -> str:
    """The short queue summary systemctl status shows."""
    stats = views.stats()
    up = sum(1 for w in stats.workers if w.state in ("idle", "busy"))
    return f"{stats.queue_depth} waiting, {stats.running_jobs} running, {up}/{len(stats.workers)} workers up"


async def _report_status(notifier: systemd.Notifier, views: Views) -> None:
    while True:
        notifier.status(status_line(views))  # sent only when it changes
        await asyncio.sleep(1.0)


GIL_SWITCH_INTERVAL_S = 0.001


async def serve(config_path: Path | None, log_level: str | None) -> int:
    config = load_config(config_path)
    setup_logging(log_level or config.daemon.log_level)
    notifier = systemd.Notifier()
    os.umask(0o077)  # users' transcripts and audio are the daemon's alone, whatever umask it inherited
    # Threads (spooling, flushes, the orphan scan, retention) run Python too: the loop waits at most this long
    # for the interpreter when one holds it, not the default 5 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    state_dir = Path(config.daemon.state_dir)
    prepare_state_dir(state_dir)
    lock = StateDirLock(state_dir)
    lock.acquire()  # before the database and the socket: a second daemon must touch neither
    store: Store
    if config.store.shared:
        c = config.store
        shared = PgStore(
            c.url, c.host_id, lease_s=c.lease_s, release=__version__, password=read_password(c.password_file),
            connect_timeout_s=c.connect_timeout_s, statement_timeout_s=c.statement_timeout_s,
            reconnect_backoff_s=c.reconnect_backoff_s, reconnect_backoff_max_s=c.reconnect_backoff_max_s,
        )  # fmt: skip
        notifier.status("connecting to the job database")
        await asyncio.to_thread(shared.open)  # schema migrated under an advisory lock, host registered
        store = shared
        cache = AudioCache(state_dir / "audio-cache", config.store.audio_cache_bytes)
        app = App(
            config, store, Spool(state_dir / "spool"), NvmlProbe(exclude=frozenset(config.gpu.exclude)),
            config_loader=lambda: load_config(config_path), pruner=PgPruner(shared.connect), shared=shared,
            audio_cache=cache,
        )  # fmt: skip
    else:
        sqlite = SqliteStore(state_dir / "jobs.sqlite3", busy_timeout_s=config.storage.busy_timeout_s)
        store = sqlite
        app = App(
            config, store, Spool(state_dir / "spool"), NvmlProbe(exclude=frozenset(config.gpu.exclude)),
            config_loader=lambda: load_config(config_path), pruner=SqlitePruner(sqlite.path),
        )  # fmt: skip
    app.daemon.install_signal_handlers()
    # The HTTP API at the metrics' address: one server serves both (the metrics paths without a token).
    http_listen = config.http.listen
    shared_address = bool(http_listen) and config.metrics.enabled and http_listen == config.metrics.listen
    metrics = metrics_server(
        {"/metrics": app.system_metrics, "/metrics/gpu": app.gpu_metrics}, config.metrics
    )
    api = (
        HttpServer(app.http_app(shared_address), config.http, "HTTP API", handler_cancellation=True)
        if http_listen
        else None
    )
    server = ControlServer(
        app.handlers, app.watchers, app.snapshot, config.daemon.max_request_bytes,
        limits=lambda: app.daemon.config.daemon, worker_pids=app.fleet.pids,
    )  # fmt: skip
    socket_path = Path(config.daemon.socket_path)
    sock = systemd.listen_socket()  # socket activation: whisperd.socket holds the socket for us
    owns_socket = sock is None
    if sock is None:
        prepare_socket_dir(socket_path)  # traversable despite the umask: the socket's mode is the gate
        sock = bind_socket(socket_path, config.daemon.socket_mode)  # refuses if another daemon answers there
    background: list[asyncio.Task[None]] = []
    try:
        if config.metrics.enabled and not shared_address:
            await metrics.start(config.metrics.listen)  # a taken port is retried in the background
        if api is not None:
            await api.start(http_listen)  # likewise
        notifier.status("recovering the queue and starting workers")
        await app.daemon.start()
        await server.start(sock)
        where = socket_path if owns_socket else "the socket systemd passed"
        log.info("whisperd %s ready on %s (state in %s)", __version__, where, state_dir)
        notifier.ready(status_line(app.views))
        background.append(asyncio.create_task(_report_status(notifier, app.views)))
        if (interval := notifier.watchdog_interval_s()) is not None:
            background.append(asyncio.create_task(notifier.watchdog(interval)))
        await app.run()
        notifier.stopping(f"draining: {status_line(app.views)}")
        await server.stop_accepting()
        if api is not None:
            api.stop_accepting()  # requests already in go on while running jobs finish
        await app.drain(app.daemon.config.daemon.drain_timeout_s)
    finally:
        for task in background:
            task.cancel()
        await metrics.close()
        if api is not None:
            await api.close()  # a request still waiting for its job: its client is cut, its job cancelled
        await server.close()
        store.close()
        if owns_socket:
            socket_path.unlink(missing_ok=True)
        lock.release()  # last: the next daemon may start once the database is closed and the socket gone
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
