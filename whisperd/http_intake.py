"""An upload's way into the queue, shared by the OpenAI routes and /v1/whisperd/jobs: refused before its
body is read where the queue or the caller's limits already say no; read within http.upload_timeout_s, with
at most daemon.max_spools_per_user uploads of one user at once; then queued by the same Handlers.accept as
a socket submit, so limits, fair share and the journal treat both alike."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from aiohttp import web

from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import BadRequest, Busy
from whisperd.handlers import Caller, Handlers
from whisperd.http_common import UploadTimeout, submit_request
from whisperd.http_upload import Form, UploadLimits, read_form
from whisperd.spool import Spool


class Intake:
    def __init__(
        self, handlers: Handlers, spool: Spool, executor: Executor, config: Callable[[], Config]
    ) -> None:
        self._handlers = handlers
        self._spool = spool
        self._executor = executor
        self._config = config
        self._uploading: Counter[int] = Counter()  # uid -> uploads being read

    def uploading(self, uid: int) -> int:
        return self._uploading[uid]

    async def receive(self, request: web.Request, caller: Caller) -> Form:
        """The request's form with its file spooled (the caller queues or discards it)."""
        config = self._config()
        # What can be refused before a byte of audio is read: draining, a full disk, a full queue, the
        # caller's limits (the model and the options are checked once their fields are read).
        self._handlers.check_submit(submit_request("upload", {}), caller, config)
        per_user = config.daemon.max_spools_per_user
        if self._uploading[caller.uid] >= per_user:
            raise Busy(
                f"{self._uploading[caller.uid]} of your uploads are still being received (at most {per_user} "
                "at once, daemon.max_spools_per_user); try again when they are done"
            )
        limits = UploadLimits(
            max_bytes=min(config.http.max_upload_bytes, config.daemon.max_audio_bytes),
            max_duration_s=config.transcribe.max_audio_duration_s,
        )
        self._uploading[caller.uid] += 1
        try:
            async with asyncio.timeout(config.http.upload_timeout_s):
                form = await read_form(request, self._spool, self._executor, limits)
        except TimeoutError:
            raise UploadTimeout(
                f"the upload was not received within {config.http.upload_timeout_s:g} s "
                "(http.upload_timeout_s)"
            ) from None
        finally:
            self._uploading[caller.uid] -= 1
            if self._uploading[caller.uid] <= 0:
                del self._uploading[caller.uid]
        if form.file is None:
            raise BadRequest("no audio: send the file in a form part named 'file'")
        return form

    def discard(self, form: Form) -> None:
        if form.file is not None:
            self._spool.discard(form.file.path)

    async def queue(self, form: Form, caller: Caller, options: dict[str, Any]) -> p.JobView:
        """The uploaded file as a job with these options (the protocol's Submit fields); the spool file is
        the job's, or discarded if it is refused."""
        assert form.file is not None
        try:
            request = submit_request(form.file.filename, options)
            config = self._config()
            model = self._handlers.check_submit(request, caller, config)
        except BaseException:
            self.discard(form)
            raise
        [job] = await self._handlers.accept(request, caller, model, [(form.file.path, form.file.size_bytes)])
        return job.view()
