"""The fedmeta installed on this machine as Flower sees it: its FAB and that FAB's hash, and the Runtime API
through which an executor of ours claims the tasks of a SuperNode or SuperLink on the same machine.

A hospital runs only a FAB byte-identical to its installation (:mod:`client.trusted_app`); the server
submits exactly that FAB and starts its ServerApp ahead for it (:mod:`server.serverapp_executor`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.flower_processes import PROJECT_DIR, TASK_POLL_S

log = logging.getLogger(__name__)


def app_files(root: Path = PROJECT_DIR) -> dict[str, Path]:
    """The files Flower's ``collect_files`` finds in the app folder ``root`` that its FAB build keeps, without
    walking the folders its ``.gitignore`` excludes whole (a virtual environment there holds tens of thousands)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    gitignore = root / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    files = {}
    for folder, subfolders, names in os.walk(root, followlinks=False):
        relative = Path(folder).relative_to(root)
        subfolders[:] = [d for d in subfolders if not ignored.match_file(f"{(relative / d).as_posix()}/")]
        for name in names:
            if not (Path(folder) / name).is_symlink():
                files[(relative / name).as_posix()] = Path(folder) / name
    return files


def app_fab(root: Path = PROJECT_DIR) -> bytes:
    """The FAB Flower builds from the app folder ``root`` (``flwr run`` of it; the build is deterministic)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(root))[0]


def installed_fab_hash() -> str:
    """SHA-256 of the installed fedmeta's :func:`app_fab`, as Flower names a FAB."""
    return hashlib.sha256(app_fab()).hexdigest()


def task_gone(err: BaseException) -> bool:
    """The SuperNode or SuperLink answered a task's call that it no longer knows the task: its run stopped (403) or
    its token is gone (401)."""
    import httpx

    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403)


def task_retry_invoker() -> Any:
    """Flower's retry invoker for one task's calls, except that a task the SuperNode or SuperLink no longer knows
    (its run stopped: 403; its token gone: 401) fails that call with the HTTP error. Flower's own sends SIGINT to
    the whole process on a 401 (ending a one-task ``flwr-clientapp``) and raises past ``httpx.HTTPError`` on a
    403, which would end an executor that serves every later task too."""
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_should_giveup = invoker.should_giveup

    def should_giveup(err: Exception) -> bool:
        return task_gone(err) or flower_should_giveup(err)

    invoker.should_giveup = should_giveup
    return invoker


@dataclass(frozen=True)
class RuntimeApi:
    """A SuperNode's or SuperLink's Runtime API, reached as it tells its executor."""

    address: str
    insecure: bool
    certificates: bytes | None  # None with TLS: the system's root certificates

    def client(self, component: str, token: str | None = None) -> Any:
        """The executor's own client (no token), or one task's."""
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker() if token is None else task_retry_invoker(),
        )

    def claimed_tasks(self, task_types: list[int], peer: str) -> Iterator[tuple[str, Any]]:
        """``(token, task)`` for every task of ``task_types`` the ``peer`` (SuperNode or SuperLink) hands out,
        claimed as the executor, for as long as the caller takes them."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        executor = self.client("SuperExec")
        request = AcquireTaskRequest(supported_task_types=task_types)
        while True:
            try:
                claimed = executor.AcquireTask(request)
            except httpx.HTTPError as err:  # the peer restarting its API; it ends this process when it exits
                log.warning("the %s's Runtime API did not answer (%s); asking again", peer, err)
                time.sleep(1.0)
                continue
            if claimed.HasField("task") and claimed.token:
                yield claimed.token, claimed.task
            else:
                time.sleep(TASK_POLL_S)
