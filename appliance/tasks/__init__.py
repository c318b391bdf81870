"""Tasks and their jobs: a script or commands run in a sandbox (bubblewrap), with limits.

``Sandbox.run(job)`` runs one ``Job`` and returns its ``JobResult``; ``Sandbox.capabilities()``
says whether this machine can run jobs at all, and what holds them. See ``sandbox.py`` for what a
job sees and how it is held.
"""

from appliance.tasks.jobs import Job, JobMode, JobResult, Limits, Outcome, Truncated
from appliance.tasks.output import OutputChunk
from appliance.tasks.sandbox import INFERENCE_SOCKET, WORK_DIR, Sandbox, SandboxCapabilities

__all__ = [
    "INFERENCE_SOCKET",
    "WORK_DIR",
    "Job",
    "JobMode",
    "JobResult",
    "Limits",
    "Outcome",
    "OutputChunk",
    "Sandbox",
    "SandboxCapabilities",
    "Truncated",
]
