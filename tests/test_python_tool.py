"""The python tool's sandbox: each escape attempt ends as an error observation within its limits."""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest

from treegrpo.envs.tools import ToolsEnv
from treegrpo.tokenizer import train_tokenizer
from treegrpo.tools.python_sandbox import CPU_SECONDS, WALL_SECONDS, SandboxError, network_isolated, run_code

pytestmark = pytest.mark.skipif(os.name != "posix", reason="rlimits and process groups are POSIX")


@pytest.fixture(scope="module")
def env():
    tok = train_tokenizer(ToolsEnv(["python"]).tokenizer_texts(), kind="bpe", vocab_size=500)
    return ToolsEnv(["python"], tokenizer=tok, tool_timeout=WALL_SECONDS + 5)


def python_call(code: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "python", "arguments": {"code": code}}) + "\n</tool_call>"


def run_in_env(env, code: str) -> tuple[str, float, int]:
    state, _ = env.start({"question": "q", "golden_answers": ["a"]})
    t0 = time.perf_counter()
    (r,) = env.step([state], [python_call(code)])
    return r.observation, time.perf_counter() - t0, r.tool_failures


def test_plain_code_runs(env):
    obs, _, failed = run_in_env(env, "print(6 * 7)")
    assert failed == 0 and "<tool_response>\n42\n\n</tool_response>" in obs


OUTSIDE = f"/tmp/treegrpo-sandbox-escape-{uuid.uuid4().hex}"
ATTACKS = {
    "infinite loop": ("while True:\n    pass", "limit|timed out"),  # CPU limit, or wall time when busy
    "memory bomb": ("x = bytearray(8 * 1024**3)\nprint(len(x))", "MemoryError"),
    "growing memory": ("xs = []\nwhile True:\n    xs.append(' ' * 10**7)", "MemoryError"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "os.fork is not allowed"),
    "subprocess": ("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", "not allowed"),
    "write outside": (f"open({OUTSIDE!r}, 'w').write('pwned')", "writing outside the working directory"),
    "network": (
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=2)",
        "not allowed",
    ),
    "sleep": ("import time\ntime.sleep(60)", "timed out"),
    "flood output": ("while True:\n    print('x' * 10000)", "output larger than"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_escape_attempts_end_as_error_observations(env, name):
    code, expected = ATTACKS[name]
    obs, seconds, failed = run_in_env(env, code)
    assert failed == 1 and "Error: SandboxError:" in obs and re.search(expected, obs), obs[:300]
    assert seconds < WALL_SECONDS + 3 * CPU_SECONDS + 5  # within the limits, on a busy 2-core machine
    assert not os.path.exists(OUTSIDE)


def test_network_namespace_when_available():
    """With `unshare -n` the socket never reaches a network even without the audit hook's refusal."""
    if not network_isolated():
        pytest.skip("this machine cannot create network namespaces; the audit hook alone blocks sockets")
    import subprocess
    import sys

    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", "import socket; print(socket.if_nameindex())"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0 and "eth" not in out.stdout  # only the loopback device exists


def test_the_training_process_survives_and_the_sandbox_stays_usable():
    for code, _ in ATTACKS.values():
        with pytest.raises(SandboxError):  # every attack fails in the child; this process carries on
            run_code(code, wall_seconds=3)
    assert run_code("print('still fine')") == "still fine\n"
