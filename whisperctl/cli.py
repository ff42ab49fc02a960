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


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    jobs = client.submit(
        args.files, model=args.model, language=args.language, task=args.task,
        priority=args.priority, word_timestamps=args.word_timestamps, prompt=args.prompt,
        temperature=args.temperature,
    )  # fmt: skip
    if not args.wait:
        if args.json:
            _json(jobs)
        else:
            print("\n".join(str(j.id) for j in jobs))
        return EXIT_OK
    from whisperctl.follow import follow

    final = follow(client, [j.id for j in jobs], None, args.json or args.quiet)
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
    from whisperctl.follow import bars, follow

    try:
        jobs = follow(client, args.ids, args.timeout, args.json or args.quiet)
    except TimeoutError:
        print(f"whisperctl: timed out after {args.timeout}s", file=sys.stderr)
        return EXIT_TIMEOUT
    if args.json:
        _json(list(jobs.values()))
    ok = all(j.state is JobState.COMPLETED for j in jobs.values())
    if not ok and bars(args.json or args.quiet):  # a bar shows the state, the lines also said why
        from whisperctl import render

        for job in jobs.values():
            if job.state is not JobState.COMPLETED:
                print(render.job_failed_line(job), file=sys.stderr)
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


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    from whisperctl import top

    return top.run(client, args.interval, args.once, _user_name)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    pong = client.ping()
    print(f"whisperd {pong.version} (protocol {pong.protocol}) on {client.path}")
    return EXIT_OK


def cmd_token_create(client: Client, args: argparse.Namespace) -> int:
    created = client.token_create(args.user, args.comment)
    if args.json:
        _json(created)
    else:
        print(created.token)
    info = created.info
    print(
        f"whisperctl: token {info.id} for {printable(info.user)} (uid {info.uid}) made; it is not shown "
        f"again: keep it now (whisperctl token revoke {info.id} ends it)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_token_revoke(client: Client, args: argparse.Namespace) -> int:
    revoked = client.token_revoke(args.id)
    user = f" of {printable(revoked.info.user)}" if revoked.info is not None else ""
    print(f"token {printable(revoked.id)}{user} revoked")
    return EXIT_OK


def cmd_token_list(client: Client, args: argparse.Namespace) -> int:
    tokens = client.token_list()
    if args.json:
        _json(tokens)
    else:
        from whisperctl import render

        sys.stdout.write(render.tokens_table(tokens))
    return EXIT_OK


def cmd_completion(client: Client, args: argparse.Namespace) -> int:
    from whisperctl import completion

    sys.stdout.write(completion.script(build_parser(), args.shell))
    return EXIT_OK


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


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
    s.add_argument(
        "--prompt", metavar="TEXT",
        help="Whisper's initial prompt: names, spellings and style to follow (at most 4096 characters)",
    )  # fmt: skip
    s.add_argument(
        "--temperature", type=_temperature, metavar="T",
        help="sample at this one temperature, 0..1 (0: greedy, no fallback); default: 0, then higher ones "
        "where decoding fails",
    )  # fmt: skip
    s.add_argument(
        "--wait", action="store_true",
        help="wait and print the transcripts; progress on stderr: bars on a terminal, else a line per change",
    )  # fmt: skip
    s.add_argument("--format", choices=FORMATS, default="txt", help="with --wait")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress on stderr")
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
    s.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
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

    s = command("top", "live view of devices, workers, the queue and throughput (q quits)")
    s.add_argument(
        "--interval", type=_positive, default=2.0, metavar="S",
        help="seconds between refreshes of the counts, and between blocks when not on a terminal",
    )  # fmt: skip
    s.add_argument("--once", action="store_true", help="print one plain block and exit")
    s.set_defaults(func=cmd_top)

    s = command("ping", "check the daemon answers")
    s.set_defaults(func=cmd_ping)

    s = command("token", "bearer tokens of the HTTP API (root or the daemon's user only)")
    token = s.add_subparsers(dest="token_command", required=True)

    def token_command(name: str, text: str) -> argparse.ArgumentParser:
        return token.add_parser(name, help=text, formatter_class=_HelpFormatter)

    t = token_command("create", "a token acting as a user; printed once")
    t.add_argument("--user", required=True, metavar="NAME", help="a user of the daemon's machine")
    t.add_argument("--comment", default="", metavar="TEXT", help="what it is for (at most 256 characters)")
    t.add_argument("--json", action="store_true", help="print the token and its details as JSON")
    t.set_defaults(func=cmd_token_create)
    t = token_command("revoke", "revoke a token by its id")
    t.add_argument("id")
    t.set_defaults(func=cmd_token_revoke)
    t = token_command("list", "the tokens (ids and users, never a secret)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_token_list)

    s = command("completion", "print the shell completion script (make install installs both)")
    s.add_argument("shell", choices=["bash", "zsh"])
    s.set_defaults(func=cmd_completion)
    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "__complete" in given[:3]:  # the completion scripts asking for job ids or models: not a command
        from whisperctl import completion

        return completion.answer(given)
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
