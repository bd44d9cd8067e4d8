"""The ``python`` tool: run model-written code in a limited subprocess.

What it enforces (Linux):

- a fresh ``python -I -S`` process in its own session, in an empty temporary directory that is
  deleted afterwards, with a minimal environment (no inherited variables, ``HOME`` = the temp dir);
- rlimits: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), size of any file written,
  including its output (``RLIMIT_FSIZE``), open files; and a wall-clock timeout after which the
  whole process group is killed;
- no network: the process runs in a new network namespace (``unshare -n``) when the machine allows
  it (root or unprivileged user namespaces), and in any case under an audit hook that refuses
  sockets;
- the audit hook also refuses ``fork`` / ``exec`` / ``subprocess`` / ``os.system`` (fork bombs),
  ``ctypes``, and opening files for writing outside the temp dir.

What it does NOT give: a security boundary against a determined attacker. Audit hooks run inside
the sandboxed interpreter and can be evaded by code that finds a way around them; reading files
the user can read is allowed; without ``unshare`` the network block rests on the audit hook alone;
``RLIMIT_NPROC`` does not bind root. Run untrusted models at scale inside a container or VM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_SECONDS = 2
WALL_SECONDS = 5.0
MEMORY_BYTES = 512 * 1024 * 1024
MAX_FILE_BYTES = 1024 * 1024
MAX_OUTPUT_CHARS = 2000

# Runs first inside the sandboxed interpreter: an audit hook refusing what the code must not do.
_PRELUDE = r"""
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_DENY = {"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.__new__",
         "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
         "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "os.putenv", "os.chdir"}
def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket"):
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and len(args) > 1:
        path, mode = args[0], args[1]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(mode, int) and mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(path))
            if p != _ROOT and not p.startswith(_ROOT + os.sep):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({p})")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.symlink", "os.link"):
        p = os.path.realpath(os.fsdecode(args[0]))
        if p != _ROOT and not p.startswith(_ROOT + os.sep):
            raise PermissionError(f"sandbox: changing files outside the working directory is not allowed ({p})")
sys.addaudithook(_hook)
del _hook
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
exec(_code, {"__name__": "__main__"})
"""


class SandboxError(RuntimeError):
    """The code failed, ran past a limit, or could not be started; the message is for the model."""


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``("unshare", "-n")`` (or ``-rn``) when a new network namespace can be made here, else ()."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for flags in (("-n",), ("-r", "-n")):
        try:
            ok = subprocess.run([exe, *flags, "true"], capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (exe, *flags)
    return ()


def network_isolated() -> bool:
    """Whether the python tool runs in its own network namespace on this machine."""
    return bool(_netns_prefix())


def _limits(cpu: int, memory: int, fsize: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))


def run_code(
    code: str,
    cpu_seconds: int = CPU_SECONDS,
    wall_seconds: float = WALL_SECONDS,
    memory_bytes: int = MEMORY_BYTES,
    max_output_chars: int = MAX_OUTPUT_CHARS,
) -> str:
    """Run `code`; returns its output (stdout and stderr), or raises SandboxError saying what went wrong."""
    if not isinstance(code, str):
        raise SandboxError("code must be a string")
    with tempfile.TemporaryDirectory(prefix="treegrpo-py-") as tmp:
        root = Path(tmp)
        (root / "main.py").write_text(code, encoding="utf-8", errors="replace")
        (root / "prelude.py").write_text(_PRELUDE, encoding="utf-8")
        out_path = root / ".output"
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
        cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-B", "prelude.py"]
        with out_path.open("wb") as out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=functools.partial(_limits, cpu_seconds, memory_bytes, MAX_FILE_BYTES),  # noqa: PLW1509
                )
            except OSError as e:
                raise SandboxError(f"could not start python: {e}") from None
            try:
                rc = proc.wait(timeout=wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        too_big = out_path.stat().st_size >= MAX_FILE_BYTES
        text = out_path.read_bytes()[: 4 * max_output_chars].decode("utf-8", errors="replace")
        text = text if len(text) <= max_output_chars else text[:max_output_chars] + " …[truncated]"
    if timed_out:
        raise SandboxError(f"timed out after {wall_seconds:g} s of wall time")
    if rc < 0:
        sig = -rc
        why = {
            signal.SIGXCPU: f"CPU time limit ({cpu_seconds} s) exceeded",
            signal.SIGKILL: "killed (CPU or memory limit)",
            signal.SIGXFSZ: f"output or file larger than {MAX_FILE_BYTES} bytes",
            signal.SIGSEGV: "crashed (segmentation fault)",
        }.get(sig, f"killed by signal {sig}")
        raise SandboxError(f"{why}\n{text}".rstrip())
    if too_big:
        raise SandboxError(f"output larger than {MAX_FILE_BYTES} bytes")
    if rc != 0:
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        raise SandboxError(f"exit code {rc}: {tail}")
    return text


def python(code: str) -> str:
    """Run a Python program and return what it prints. No network, no files outside its own directory.

    Args:
        code: The complete Python program to run; print the values you need.
    """
    return run_code(code)


__all__ = ["SandboxError", "network_isolated", "python", "run_code"]
