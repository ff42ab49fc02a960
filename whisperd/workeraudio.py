"""Where a worker reads its jobs' audio from: descriptors the daemon opened and passed over a socket (in
service: a sandboxed worker cannot open the spool), or the job's path (a worker run by hand)."""

from __future__ import annotations

import os
import socket
from typing import BinaryIO, Protocol

from whisperd import workerproto as wp


class AudioSource(Protocol):
    def open(self, batch_id: int, spec: wp.JobSpec) -> BinaryIO:
        """The job's audio, open for reading; raises OSError when it cannot be had."""
        ...

    def drain(self) -> None:
        """The batch is over: let go of the audio of its jobs that were never opened."""
        ...


class PathAudio:
    """Opens the job's audio by its path (a worker run without the daemon's descriptors)."""

    def open(self, batch_id: int, spec: wp.JobSpec) -> BinaryIO:
        return open(spec.audio_path, "rb")  # the caller closes it

    def drain(self) -> None:
        pass


class AudioInbox:
    """The jobs' audio as descriptors the daemon opened and sent over a socket, one message per job of a
    batch, in order, before the batch itself: a sandboxed worker cannot open the spool, and needs not."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(False)  # every message of a batch is there before the batch is

    def _next(self) -> tuple[int, int, int | None] | None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, wp.AUDIO_MESSAGE.size, 1)
        except BlockingIOError:
            return None
        if len(data) != wp.AUDIO_MESSAGE.size:
            for fd in fds:
                os.close(fd)
            return None
        batch_id, job_id = wp.AUDIO_MESSAGE.unpack(data)
        return batch_id, job_id, fds[0] if fds else None

    def open(self, batch_id: int, spec: wp.JobSpec) -> BinaryIO:
        while (message := self._next()) is not None:
            got_batch, got_job, fd = message
            if (got_batch, got_job) == (batch_id, spec.job_id):
                if fd is None:
                    raise FileNotFoundError("the audio is no longer in the spool")
                return os.fdopen(fd, "rb")
            if fd is not None:  # a job of the batch that was skipped (cancelled, stopped)
                os.close(fd)
        raise FileNotFoundError("the daemon passed no audio for this job")

    def drain(self) -> None:
        while (message := self._next()) is not None:
            if message[2] is not None:
                os.close(message[2])
