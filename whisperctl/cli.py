"""whisperctl: submit audio to whisperd, follow it, fetch results, cancel; inspect devices and stats."""

# Started for every command, so it imports only what `ping` needs: whisperctl.render (and pwd) are imported
# by the commands that print with them (tests/unit/test_cli_imports.py keeps it so).
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from collections.abc import Sequence

import msgspec

from whisperctl.client import Client, Dropped, NoReply, Unreachable
from whisperd import protocol as p
from whisperd.errors import WhisperdError
from whisperd.jobs import JobState
from whisperd.protocol import printable

EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_UNREACHABLE, EXIT_DROPPED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 124
EXIT_CODES = """exit status:
  0    success
  1    a job did not complete (FAILED or CANCELLED), with submit --wait or wait
  2    whisperd refused the request (the message says why), or bad arguments
  3    whisperd is unreachable: no socket, not running, or no permission to connect; nothing was sent
  4    the connection dropped before the reply (whisperd stopped, restarted or disconnected this client):
       the request may or may not have taken effect; check with status
  124  timed out: wait --timeout, or whisperd did not reply within 600 s
  130  interrupted"""
FORMATS = ("txt", "srt", "vtt", "tsv", "json")  # render.FORMATS, which a test keeps equal to this


def _columns() -> int:
    """shutil.get_terminal_size().columns without importing shutil (and the compression modules it brings):
    argparse sizes a formatter for every argument it adds, so every run would import it."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


class _RawDescriptionHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


@functools.cache
def _user_name(uid: int) -> str | None:
    """The name of a uid in this machine's user database (the daemon sends uids only)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _json(obj: object) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")


def _follow(client: Client, ids: Sequence[int], timeout_s: float | None, quiet: bool) -> dict[int, p.JobView]:
    """Follow jobs until each is terminal; progress lines go to stderr. Raises TimeoutError."""
    from whisperctl import render

    deadline = time.monotonic() + timeout_s if timeout_s else None
    with client.watch() as events:
        # Read the state after subscribing, so no transition between the two is missed.
        jobs = {j.id: j for j in client.status(ids)}
        shown: dict[int, tuple[str, int]] = {}

        def show(job: p.JobView) -> None:
            key = (job.state.value, int(job.progress))
            if not quiet and shown.get(job.id) != key:
                shown[job.id] = key
                print(render.job_event_line(job), file=sys.stderr, flush=True)

        for job in jobs.values():
            show(job)
        for event in events:
            if all(j.state.terminal for j in jobs.values()):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            if isinstance(event, p.JobEventReply) and event.job.id in jobs:
                jobs[event.job.id] = event.job
                show(event.job)
                if all(j.state.terminal for j in jobs.values()):
                    break
    return jobs


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    jobs = client.submit(
        args.files, model=args.model, language=args.language, task=args.task,
        priority=args.priority, word_timestamps=args.word_timestamps,
    )  # fmt: skip
    if not args.wait:
        if args.json:
            _json(jobs)
        else:
            print("\n".join(str(j.id) for j in jobs))
        return EXIT_OK
    final = _follow(client, [j.id for j in jobs], None, args.json)
    return _print_results(client, list(final.values()), args.format, args.json)


def _print_results(client: Client, jobs: list[p.JobView], fmt: str, as_json: bool) -> int:
    from whisperctl import render

    out: list[object] = []
    status = EXIT_OK
    for job in jobs:
        if job.state is not JobState.COMPLETED:
            status = EXIT_JOB_FAILED
            print(render.job_failed_line(job), file=sys.stderr)
            out.append({"job": job, "transcript": None})
            continue
        result = client.result(job.id)
        if as_json:
            out.append({"job": result.job, "transcript": result.transcript})
        else:
            if len(jobs) > 1:
                print(f"==> {printable(job.filename)} (job {job.id}) <==")
            sys.stdout.write(render.format_transcript(result.transcript, fmt))
    if as_json:
        _json(out)
    return status


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    jobs = client.status(args.ids, args.state, args.limit)
    if args.json:
        _json(jobs)
    else:
        from whisperctl import render

        sys.stdout.write(render.jobs_table(jobs, time.time()))
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    try:
        jobs = _follow(client, args.ids, args.timeout, args.json)
    except TimeoutError:
        print(f"whisperctl: timed out after {args.timeout}s", file=sys.stderr)
        return EXIT_TIMEOUT
    if args.json:
        _json(list(jobs.values()))
    ok = all(j.state is JobState.COMPLETED for j in jobs.values())
    return EXIT_OK if ok else EXIT_JOB_FAILED


def cmd_result(client: Client, args: argparse.Namespace) -> int:
    from whisperctl import render

    result = client.result(args.id)
    sys.stdout.write(render.format_transcript(result.transcript, args.format))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    reply = client.cancel(args.ids)
    for job in reply.jobs:
        print(f"job {job.id} {job.state}")
    for error in reply.errors:
        print(f"whisperctl: job {error.job_id}: {printable(error.message)}", file=sys.stderr)
    return EXIT_ERROR if reply.errors else EXIT_OK


def cmd_gpu(client: Client, args: argparse.Namespace) -> int:
    devices = client.gpu()
    if args.json:
        _json(devices)
    else:
        from whisperctl import render

        sys.stdout.write(render.devices_table(devices))
    return EXIT_OK


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        _json(stats)
    else:
        from whisperctl import render

        sys.stdout.write(render.stats_text(stats, _user_name))
    return EXIT_OK


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    from whisperctl import render

    with client.watch() as events:
        for event in events:
            if args.json:
                sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
            elif isinstance(event, p.JobEventReply):
                print(render.job_event_line(event.job))
            elif isinstance(event, p.DeviceSnapshot):
                sys.stdout.write(render.devices_table(event.devices))
            elif isinstance(event, p.SystemSnapshot):
                sys.stdout.write(render.stats_text(event.stats, _user_name))
            sys.stdout.flush()
    return EXIT_OK


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    pong = client.ping()
    print(f"whisperd {pong.version} (protocol {pong.protocol}) on {client.path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisperctl",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=_RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", help="control socket (default: $WHISPERD_SOCKET or the daemon's default)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, formatter_class=_HelpFormatter)

    s = command("submit", "queue audio files")
    s.add_argument("files", nargs="+")
    s.add_argument("--model")
    s.add_argument("--language")
    s.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    s.add_argument(
        "--priority", type=int, default=0,
        help="higher runs first (-1000..1000); above 0 is for root and the daemon's user unless configured",
    )  # fmt: skip
    s.add_argument("--word-timestamps", action="store_true")
    s.add_argument("--wait", action="store_true", help="wait and print the transcripts")
    s.add_argument("--format", choices=FORMATS, default="txt", help="with --wait")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_submit)

    s = command("status", "the queue, like squeue")
    s.add_argument("ids", nargs="*", type=int)
    s.add_argument("--state", choices=[st.value for st in JobState])
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = command("wait", "wait for jobs; exit 0 only if every one COMPLETED")
    s.add_argument("ids", nargs="+", type=int)
    s.add_argument("--timeout", type=float, help="seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_wait)

    s = command("result", "print a transcript")
    s.add_argument("id", type=int)
    s.add_argument("--format", choices=FORMATS, default="txt")
    s.set_defaults(func=cmd_result)

    s = command("cancel", "cancel jobs")
    s.add_argument("ids", nargs="+", type=int)
    s.set_defaults(func=cmd_cancel)

    for name, func, text in (("gpu", cmd_gpu, "devices"), ("stats", cmd_stats, "queue and workers")):
        s = command(name, text)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)

    s = command("watch", "stream job events and snapshots")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_watch)

    s = command("ping", "check the daemon answers")
    s.set_defaults(func=cmd_ping)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:
        # Run as the program: what is loaded by now lives as long as the process, so the collector need not
        # walk it again, in a long watch or in the collections at exit (those cost a ping 5 ms).
        gc.freeze()
    client = Client(args.socket)
    try:
        status: int = args.func(client, args)
        return status
    except Unreachable as exc:
        return _fail(exc, EXIT_UNREACHABLE)
    except Dropped as exc:
        return _fail(exc, EXIT_DROPPED)
    except NoReply as exc:
        return _fail(exc, EXIT_TIMEOUT)
    except WhisperdError as exc:
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _fail(exc: WhisperdError, status: int) -> int:
    print(f"whisperctl: {printable(exc.message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
