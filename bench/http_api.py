"""The HTTP API against the control socket, in the same run (issue 13).

    make bench                     # or: .venv/bin/python bench/http_api.py [--jobs 20] [--upload-mib 512]

1. Latency of a short clip, end to end: the real `openai` SDK's transcriptions.create against
   Client.submit + watch until the job ends + Client.result over the socket; one real daemon, one CPU worker,
   real tiny.en, the same clip, requests one after another. The ratio says what HTTP adds to a job.
2. A large upload: a file of --upload-mib MiB POSTed to /v1/whisperd/jobs (a daemon with no workers: the job
   stays queued) against the same file submitted over the socket; throughput of each, and the daemon's peak
   resident memory above its level before the upload (sampled every 5 ms): an upload is streamed to the
   spool, never held whole, so it stays a few MiB whatever the file's size.
A benchmark, not a test: it asserts nothing. Results go to bench/results/http-*.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from bench.common import finish_run  # noqa: E402
from tests.support.audio import SENTENCES, have_tools, speak  # noqa: E402
from tests.support.daemon import DaemonProcess, free_port  # noqa: E402
from whisperctl.client import Client  # noqa: E402
from whisperd import protocol as p  # noqa: E402

MIB = 1024 * 1024


def socket_job(client: Client, path: Path) -> float:
    started = time.perf_counter()
    with client.watch() as events:
        [job] = client.submit([str(path)])
        state = client.status([job.id])[0].state
        while not state.terminal:
            event = next(events)
            if isinstance(event, p.JobEventReply) and event.job.id == job.id:
                state = event.job.state
    client.result(job.id)
    return time.perf_counter() - started


def http_job(sdk: openai.OpenAI, path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as audio:
        sdk.audio.transcriptions.create(model="whisper-1", file=audio)
    return time.perf_counter() - started


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self.base = rss_bytes(self.pid)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return max(0, self.peak - self.base) / MIB


def stop(daemon: DaemonProcess) -> None:
    """The run's daemon stopped and its socket dir removed; its state stays until the run's folder goes."""
    daemon.stop()
    shutil.rmtree(daemon.socket.parent, ignore_errors=True)


def start(base: Path, name: str, workers: int, upload_mib: int) -> tuple[DaemonProcess, int, str]:
    port = free_port()
    config = {
        "daemon": {"socket_mode": 0o666, "max_audio_bytes": (upload_mib + 1) * MIB},
        "workers": {"cpu_workers": workers},
        "http": {"max_upload_bytes": (upload_mib + 1) * MIB},
    }
    daemon = DaemonProcess(base / name, config, env={"WHISPERD_HTTP_ADDR": f"127.0.0.1:{port}"}).start()
    token = daemon.client.token_create(user="root").token
    return daemon, port, token


def latency(base: Path, jobs: int, clip: Path) -> dict[str, Any]:
    daemon, port, token = start(base, "latency", 1, 1)
    try:
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
        socket_job(daemon.client, clip), http_job(sdk, clip)  # models loaded, connections made
        sock = [socket_job(daemon.client, clip) for _ in range(jobs)]
        http = [http_job(sdk, clip) for _ in range(jobs)]
    finally:
        stop(daemon)
    row = {"jobs": jobs, "socket_median_s": statistics.median(sock), "http_median_s": statistics.median(http)}
    row["http_over_socket"] = row["http_median_s"] / row["socket_median_s"]
    return row


def upload(base: Path, mib: int) -> dict[str, Any]:
    big = base / "big.bin"
    with open(big, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MIB))
    daemon, port, token = start(base, "upload", 0, mib)
    assert daemon.proc is not None
    try:
        with PeakRss(daemon.proc.pid) as sock_rss:
            started = time.perf_counter()
            daemon.client.submit([str(big)])
            sock_s = time.perf_counter() - started
        with PeakRss(daemon.proc.pid) as http_rss:
            started = time.perf_counter()
            boundary = "whisperdbench"
            head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
            tail = f"\r\n--{boundary}--\r\n".encode()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.putrequest("POST", "/v1/whisperd/jobs")
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            conn.putheader("Content-Length", str(len(head) + big.stat().st_size + len(tail)))
            conn.endheaders()
            conn.send(head)
            with open(big, "rb") as source:
                while chunk := source.read(MIB):
                    conn.send(chunk)
            conn.send(tail)
            status = conn.getresponse().status
            http_s = time.perf_counter() - started
    finally:
        stop(daemon)
    return {
        "upload_mib": mib, "http_status": status,
        "socket_mib_per_s": mib / sock_s, "http_mib_per_s": mib / http_s,
        "socket_peak_rss_growth_mib": sock_rss.growth_mib, "http_peak_rss_growth_mib": http_rss.growth_mib,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--upload-mib", type=int, default=512)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not have_tools():
        sys.exit("espeak-ng and sox are needed: make bench installs them")
    base = Path(tempfile.mkdtemp(prefix="whisperd-bench-http-", dir=os.environ.get("BENCH_DIR")))
    clip = speak(SENTENCES["fox"], base / "fox.wav")
    result = {"latency": latency(base, args.jobs, clip), "upload": upload(base, args.upload_mib)}
    finish_run(None, base, args.keep)
    out = REPO / "bench" / "results" / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lat, up = result["latency"], result["upload"]
    sock_ms, http_ms = lat["socket_median_s"] * 1000, lat["http_median_s"] * 1000
    print(f"short clip end to end, median of {lat['jobs']}: socket {sock_ms:.0f} ms, "
          f"HTTP (openai SDK) {http_ms:.0f} ms: {lat['http_over_socket']:.2f}x")  # fmt: skip
    growth = up["socket_peak_rss_growth_mib"], up["http_peak_rss_growth_mib"]
    print(f"{up['upload_mib']} MiB upload: socket {up['socket_mib_per_s']:.0f} MiB/s, HTTP "
          f"{up['http_mib_per_s']:.0f} MiB/s (status {up['http_status']}); daemon peak RSS growth: socket "
          f"{growth[0]:.1f} MiB, HTTP {growth[1]:.1f} MiB")  # fmt: skip
    print(f"results: {out}")


if __name__ == "__main__":
    main()
