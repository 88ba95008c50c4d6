"""Ray processes a test started, found and stopped by what it gave them (its temp dir, its ports): never
``ray stop``, which stops every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import signal

import psutil


def processes_of(temp_dir: str, *marks: str) -> list[psutil.Process]:
    """Processes whose command line names ``temp_dir`` (or a mark), and all their descendants: Ray's agents
    rename themselves (ray::DashboardAgent) and, left running after a stop, hold their ports."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part or part in marks for part in p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(found.values())


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop_processes_of(temp_dir: str, *marks: str, rounds: int = 3) -> None:
    """SIGTERM, then SIGKILL what is left, and wait for it to be gone: a kill is asynchronous (CI once saw
    gcs_server still running right after it), and a dying raylet may start a worker meanwhile, so rescan."""
    for _ in range(rounds):
        procs = running(processes_of(temp_dir, *marks))
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=8)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
