"""Which GPU an EMBED task uses: one free device per task, on any node, with any executor.

Nextflow 24.10's local executor (and AWS Batch when tasks share an instance) shows every task every
GPU, and each would use cuda:0. So a task claims one device itself: an exclusive, non-blocking
`flock` on `<lock dir>/<device uuid>.lock`, tried in order over the devices it can see. The kernel
drops the lock when the process ends, however it ends (exit, crash, SIGKILL): nothing to clean up.
The claimed device is then the only one the process sees (CUDA_VISIBLE_DEVICES=<uuid>), set before
torch touches CUDA.

What a task can see: CUDA_VISIBLE_DEVICES when set (Nextflow >= 26.10 and SLURM set it; we never
widen it), else `nvidia-smi -L`. A single visible device is used as given, without a lock: the
scheduler already chose it. Locks are keyed by GPU UUID, so two SLURM jobs that each see their own
GPU as "0" never block each other. The lock folder must be shared by the tasks of a node (default
/tmp/uce-nf-gpu-locks; the gpu profile mounts it into containers); UCE_NF_GPU_LOCK_DIR overrides it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .io import UserError

log = logging.getLogger(__name__)
DEFAULT_LOCK_DIR = "/tmp/uce-nf-gpu-locks"
_held: list = []  # open lock files of this process (closing one releases its device)


@dataclass
class Device:
    index: str  # as the task sees it: an index or a UUID from CUDA_VISIBLE_DEVICES, or nvidia-smi's index
    uuid: str | None
    name: str | None


def nvidia_smi_devices() -> list[Device]:
    """`nvidia-smi -L`: 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)'; [] when there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for m in re.finditer(r"^GPU (\d+): (.*?) \(UUID: ([^)]+)\)", out, re.MULTILINE):
        found.append(Device(m.group(1), m.group(3), m.group(2)))
    return found


def visible_devices() -> list[Device]:
    """The devices this task may use, in order; CUDA_VISIBLE_DEVICES narrows nvidia-smi's list."""
    smi = nvidia_smi_devices()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip().lower() == "all":
        return smi
    by_index = {d.index: d for d in smi}
    by_uuid = {d.uuid: d for d in smi}
    out = []
    for entry in (e.strip() for e in env.split(",")):
        if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
            break
        d = by_uuid.get(entry) or by_index.get(entry)
        out.append(Device(entry, d.uuid if d else (entry if entry.startswith(("GPU-", "MIG-")) else None),
                          d.name if d else None))
    return out


def claim_device(lock_dir: str | os.PathLike | None = None, wait_s: float = 0.0, poll_s: float = 2.0) -> Device | None:
    """Claim one visible device for this process and make it the only one CUDA shows; None if there
    is no device. With several devices all busy, waits up to wait_s seconds, then fails in one line."""
    devices = visible_devices()
    if not devices:
        return None
    if len(devices) == 1:  # the scheduler (or the user) already chose
        return _expose(devices[0])
    folder = Path(lock_dir or os.environ.get("UCE_NF_GPU_LOCK_DIR") or DEFAULT_LOCK_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    deadline, waited = time.monotonic() + wait_s, False
    while True:
        for d in devices:
            f = open(folder / f"{d.uuid or d.index}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {os.uname().nodename}\n")
            f.flush()
            _held.append(f)
            return _expose(d)
        if time.monotonic() >= deadline:
            raise UserError(f"all {len(devices)} GPUs of this node are claimed by other EMBED tasks (locks in {folder}); "
                            "run at most one EMBED task per GPU (process_gpu maxForks, or executor.cpus/memory), "
                            "or give this task its own GPU through CUDA_VISIBLE_DEVICES")
        if not waited:
            log.info("all %d GPUs of this node are claimed (locks in %s): waiting for one", len(devices), folder)
            waited = True
        time.sleep(poll_s)


def release_devices() -> None:
    while _held:
        _held.pop().close()


def _expose(d: Device) -> Device:
    os.environ["CUDA_VISIBLE_DEVICES"] = d.uuid or d.index
    log.info("GPU claimed: %s (%s, %s)", d.index, d.name or "unknown name", d.uuid or "no uuid")
    return d


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, in one line; None when it can."""
    import torch
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "no GPU is visible: CUDA_VISIBLE_DEVICES is empty (the scheduler gave this task no GPU; request one)"
    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError/AssertionError with the driver's reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        driver = _driver_version()
        if "found no nvidia driver" in reason.lower():
            return ("no NVIDIA driver is visible: no GPU on this machine, or the container was started without "
                    "GPU access (docker/podman --gpus, singularity/apptainer --nv: use -profile gpu)")
        if "too old" in reason.lower():
            return (f"the NVIDIA driver{' ' + driver if driver else ''} is too old for this torch build (CUDA "
                    f"{torch.version.cuda}): update the driver, or use an image built for an older CUDA ({reason})")
        return f"CUDA is not usable: {reason}"
    if torch.cuda.device_count() == 0:
        return "no GPU is visible to this task (torch sees 0 CUDA devices); request a GPU from the executor"
    return None


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def pick_device(name: str):
    """auto: CUDA when usable, else CPU (logged); cuda: CUDA or a one-line error, never a silent CPU run."""
    import torch
    if name == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if name == "cuda":
        if problem:
            raise UserError(f"--device cuda: {problem}")
        return torch.device("cuda")
    if problem:
        log.info("device auto: CPU (%s)", problem)
        return torch.device("cpu")
    log.info("device auto: CUDA (%s)", torch.cuda.get_device_name(0))
    return torch.device("cuda")
