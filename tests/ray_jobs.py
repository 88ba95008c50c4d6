"""Ray jobs as the tests see them: submitted with the ``ray job submit`` CLI a user types, read back
through Ray's typed ``JobSubmissionClient`` (status enums and job details, never the CLI's prose).

One failure is Ray's and not ours: the job supervisor actor dying before it launched our entrypoint (seen
here: a native crash in Ray's metrics export while the runtime env was set up). Nothing of ours ran, so a
``SubmittedJob`` resubmits once, with a warning; every other failure fails at once, with the job's logs.
"""

from __future__ import annotations

import subprocess
import time
import uuid
import warnings

from ray.dashboard.modules.job.common import JobErrorType
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def died_before_entrypoint(job: JobDetails) -> bool:
    """The supervisor died before it started our entrypoint: Ray sets ``driver_agent_http_address`` when it
    moves the job to RUNNING, just before launching the entrypoint, and ``driver_exit_code`` when the
    entrypoint exits. A supervisor that died later, or an entrypoint that failed, is not this."""
    return (job.status == JobStatus.FAILED and job.error_type == JobErrorType.JOB_SUPERVISOR_ACTOR_DIED
            and job.driver_agent_http_address is None and job.driver_exit_code is None)


class JobFailed(AssertionError):
    pass


class SubmittedJob:
    """A job submitted through the CLI (``ray_cli``: the ``ray`` executable, with ``env`` holding the
    cluster's auth settings), followed through ``client``."""

    def __init__(self, client: JobSubmissionClient, ray_cli: str, env: dict, cwd, submit_args: list[str],
                 retries: int = 1):
        self.client, self.ray_cli, self.env, self.cwd = client, ray_cli, env, cwd
        self.submit_args, self.retries = submit_args, retries
        self.attempts: list[str] = []
        self._submit()

    @property
    def id(self) -> str:
        return self.attempts[-1]

    def _submit(self) -> None:
        submission_id = f"bpo-test-{uuid.uuid4().hex[:12]}"  # ours: nothing to parse out of the CLI's output
        done = subprocess.run([self.ray_cli, "job", "submit", f"--address={self.client.get_address()}",
                               f"--submission-id={submission_id}", "--no-wait", *self.submit_args],
                              capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=300)
        if done.returncode != 0:
            raise JobFailed(f"ray job submit exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        self.attempts.append(submission_id)

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def info(self) -> JobDetails:
        """The job's details now; resubmits (once) when Ray's supervisor died before our entrypoint ran, and
        raises ``JobFailed`` with the logs when the job failed otherwise."""
        job = self.client.get_job_info(self.id)
        if died_before_entrypoint(job) and len(self.attempts) <= self.retries:
            warnings.warn(f"job {self.id}: Ray's job supervisor died before our entrypoint ran ({job.message}); "
                          "resubmitting once", stacklevel=2)
            self._submit()
            return self.client.get_job_info(self.id)
        if job.status == JobStatus.FAILED:
            raise JobFailed(f"job {self.id} FAILED ({job.error_type}, exit code {job.driver_exit_code}): "
                            f"{job.message}\n--- logs ---\n{self.logs()[-6000:]}")
        return job

    def wait(self, statuses: set[JobStatus], timeout: float) -> JobDetails:
        """Until the job reaches one of ``statuses`` (returned) or another terminal one (``JobFailed``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.info()
            if job.status in statuses:
                return job
            if job.status in TERMINAL:
                raise JobFailed(f"job {self.id} ended {job.status.value}, not {sorted(s.value for s in statuses)}: "
                                f"{job.message}\n--- logs ---\n{self.logs()[-6000:]}")
            time.sleep(1)
        raise JobFailed(f"job {self.id} still {job.status.value} after {timeout:.0f}s\n--- logs ---\n"
                        f"{self.logs()[-6000:]}")
