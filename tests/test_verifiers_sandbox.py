"""The sandbox and TestSuite: each containment mechanism with a harmless probe, then the hostile version.

Every hostile job runs only inside the sandbox, under tight limits: 2 s wall and CPU, 256 MB of
address space, 8 processes, 4 MB files, 16 MB of tmpfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

import honed
from honed.verifiers import Limits, Sandbox, SandboxError, TestSuite, Worker
from honed.verifiers import sandbox as sandbox_module
from honed.verifiers.sandbox import bwrap_problem
from verifier_helpers import tool_traj, traj

TIGHT = Limits(wall_s=2, cpu_s=2, memory_mb=256, processes=8, disk_mb=16, file_size_mb=4, output_kb=16)
ADD_TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\ndef test_neg():\n    assert add(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    problem = bwrap_problem()
    if problem:
        pytest.fail(f"the sandbox tests need bubblewrap: {problem}")
    with Sandbox(TIGHT, size=2) as sandbox:
        yield sandbox


def run(box: Sandbox, code: str, **kwargs) -> sandbox_module.SandboxResult:
    return box.run_python({"main.py": code}, **kwargs)


def last_json(result: sandbox_module.SandboxResult):
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert lines, result.output
    return json.loads(lines[-1])


# -- harmless probes of each mechanism -----------------------------------------------------------


def test_probe_identity_filesystem_environment(
    box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-should-never-be-seen")
    (tmp_path / "host-file.txt").write_text("host data")
    host_file = str(tmp_path / "host-file.txt")
    probe = f"""
import ctypes, json, os
status = open('/proc/self/status').read()
caps = status.split('CapEff:')[1].split()[0]
print(json.dumps({{
    'uid': os.getuid(), 'caps': caps, 'cwd': os.getcwd(), 'env': dict(os.environ),
    'root': sorted(os.listdir('/')), 'host_tmp': os.path.exists({host_file!r}),
    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    'new_userns': ctypes.CDLL(None, use_errno=True).unshare(0x10000000),
}}))
"""
    r = run(box, probe)
    assert r.exit_code == 0, r.output
    seen = last_json(r)
    assert seen["uid"] != 0 and seen["caps"] == "0000000000000000"
    assert seen["cwd"].startswith("/sandbox/job")
    assert "OPENAI_API_KEY" not in seen["env"] and "HONED_STORE" not in seen["env"]
    assert seen["host_tmp"] is False
    assert "home" not in seen["root"] and "var" not in seen["root"]
    assert len(seen["pids"]) <= 3  # the pid namespace: init, the zygote, this job
    assert seen["new_userns"] == -1  # seccomp: no user namespace to escape the limits in


def test_probe_limits_are_enforced(box: Sandbox) -> None:
    probe = """
import json, resource, subprocess
spawned = []
try:
    for _ in range(20):
        spawned.append(subprocess.Popen(['sleep', '5']))
except OSError as exc:
    err = type(exc).__name__
print(json.dumps({'spawned': len(spawned), 'err': err,
                  'as': resource.getrlimit(resource.RLIMIT_AS)[0], 'fsize': resource.getrlimit(resource.RLIMIT_FSIZE)[0]}))
"""
    r = run(box, probe)
    seen = last_json(r)
    assert seen["spawned"] < 8 and seen["err"] == "BlockingIOError"
    assert seen["as"] == 256 << 20 and seen["fsize"] == 4 << 20


def test_probe_leftover_processes_and_files_are_gone(box: Sandbox) -> None:
    leave = "import subprocess\nfor p in ('/tmp/left', '/dev/shm/left', '/sandbox/left'):\n    open(p, 'w').write('x')\n"
    r = run(box, leave + "subprocess.Popen(['sleep', '60'], start_new_session=True)\n")
    assert r.exit_code == 0, r.output
    look = (
        "import json, os\n"
        "procs = [open(f'/proc/{p}/cmdline').read().split(chr(0))[0] for p in os.listdir('/proc') if p.isdigit()]\n"
        "left = os.listdir('/tmp') + os.listdir('/dev/shm') + [e for e in os.listdir('/sandbox') if not e.startswith('job')]\n"
        "print(json.dumps({'procs': procs, 'left': left}))\n"
    )
    seen = last_json(run(box, look))
    # A Python prefix under /tmp (a checkout there) is bind-mounted read-only: its top folder shows.
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    mount_points = {Path(p).parts[2] for p in prefixes if Path(p).parts[1:2] in (("tmp",), ("dev",))}
    assert not any(cmd.startswith("sleep") for cmd in seen["procs"])
    assert [e for e in seen["left"] if e not in mount_points] == []


def test_probe_sysv_ipc_a_job_leaves_is_gone(box: Sandbox) -> None:
    """A SysV shared-memory segment (message queue, semaphore set) outlives the processes that
    made it, detached, and holds memory outside the job's rlimits: the next job must not find it."""
    make = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0x51A0, 1 << 20, 0o1000 | 0o600), libc.msgget(0x51A1, 0o1000 | 0o600),"
        " libc.semget(0x51A2, 1, 0o1000 | 0o600))\n"
    )
    made = run(box, make)
    assert made.exit_code == 0 and all(int(i) >= 0 for i in made.output.split()[-3:]), made.output
    look = "print([len(open(f'/proc/sysvipc/{k}').read().splitlines()) - 1 for k in ('shm', 'msg', 'sem')])\n"
    assert run(box, look).output.strip().splitlines()[-1] == "[0, 0, 0]"


def test_probe_a_job_can_leave_no_message_queue_or_key_for_the_next(box: Sandbox) -> None:
    """A POSIX message queue (the IPC namespace's mqueue, never unlinked) and a kernel key
    (charged to the sandbox's uid, on the host when the worker runs as root) outlived the job
    that made them: the next job, another run's code, read back what the first one left."""
    probe = (
        "import ctypes, json, platform\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "q = libc.mq_open(b'/honed_leak', 0o100 | 0o2, 0o600, None)\n"
        "add_key = {'x86_64': 248, 'aarch64': 217}[platform.machine()]\n"
        "k = libc.syscall(add_key, b'user', b'honed_leak', b'SECRET', 6, -4)  # the user keyring\n"
        "print(json.dumps({'mq': q, 'key': k}))\n"
    )
    seen = last_json(run(box, probe))
    assert seen == {"mq": -1, "key": -1}, seen


def test_probe_network_is_loopback_only(box: Sandbox) -> None:
    host_ip = socket.gethostbyname(socket.gethostname())
    probe = f"""
import json, socket
out = {{}}
for name, addr in {{'pg': ('127.0.0.1', 5432), 'host': ({host_ip!r}, 5432), 'internet': ('1.1.1.1', 53)}}.items():
    try:
        socket.create_connection(addr, timeout=1).close(); out[name] = 'connected'
    except OSError as exc:
        out[name] = type(exc).__name__
try:
    socket.getaddrinfo('example.com', 80); out['dns'] = 'resolved'
except OSError as exc:
    out['dns'] = type(exc).__name__
print(json.dumps(out))
"""
    seen = last_json(run(box, probe))
    assert "connected" not in seen.values() and seen["dns"] != "resolved", seen


# -- the hostile versions --------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_wall_limit(box: Sandbox) -> None:
    start = time.monotonic()
    r = run(box, "while True:\n    pass\n")
    assert r.timed_out and r.limit_hit == "wall" and r.exit_code is None
    assert time.monotonic() - start < 6


def test_fork_bomb_is_contained_and_cleaned_up(box: Sandbox) -> None:
    r = run(box, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert r.timed_out
    seen = last_json(
        run(
            box,
            "import json, os\nprint(json.dumps({'pids': [p for p in os.listdir('/proc') if p.isdigit()]}))\n",
        )
    )
    assert len(seen["pids"]) <= 3


@pytest.mark.parametrize(
    "code",
    [
        "data = bytearray(10 * 1024**3)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n",
    ],
    ids=["10GB-at-once", "10GB-gradually"],
)
def test_memory_hogs_hit_the_limit(box: Sandbox, code: str) -> None:
    r = run(box, code)
    assert r.exit_code != 0 and r.limit_hit == "memory", r.output
    assert r.max_rss_kb < 300 * 1024


def test_filling_the_disk_is_bounded(box: Sandbox, tmp_path: Path) -> None:
    big = run(box, "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n")
    assert big.exit_code != 0 and big.limit_hit == "file_size", big.output
    many = run(box, "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n")
    assert many.exit_code != 0 and many.limit_hit == "disk", many.output
    shm = run(
        box, "i = 0\nwhile True:\n    open(f'/dev/shm/f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n"
    )
    assert shm.exit_code != 0 and shm.limit_hit == "disk", shm.output
    assert run(box, "import os\nassert os.listdir('.') == ['main.py'], os.listdir('.')\n").exit_code == 0


def test_writes_outside_the_job_directory_fail(box: Sandbox, tmp_path: Path) -> None:
    targets = [str(tmp_path / "pwned"), "/usr/pwned", "/pwned", "/etc/pwned", "/proc/sys/kernel/hostname"]
    probe = f"""
import json
out = {{}}
for path in {targets!r}:
    try:
        open(path, 'w').write('pwned'); out[path] = 'written'
    except OSError as exc:
        out[path] = type(exc).__name__
print(json.dumps(out))
"""
    seen = last_json(run(box, probe))
    assert "written" not in seen.values(), seen
    assert (
        not (tmp_path / "pwned").exists() and not Path("/pwned").exists() and not Path("/usr/pwned").exists()
    )


def test_the_store_database_is_out_of_reach(box: Sandbox, sqlite_url: str) -> None:
    store = honed.open_store(sqlite_url)
    db = store.engine.url.database
    r = run(box, f"print(open({db!r}, 'rb').read(16))\n")
    assert r.exit_code != 0 and "FileNotFoundError" in r.output


def test_hidden_paths_inside_a_mounted_prefix_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "store.db").write_text("secret rows")
    (prefix / "lib.txt").write_text("library")
    real_roots = sandbox_module._python_roots
    monkeypatch.setattr(sandbox_module, "_python_roots", lambda python: [*real_roots(python), str(prefix)])
    with Sandbox(TIGHT, size=1, hide=[prefix / "store.db"]) as sandbox:
        probe = f"""
print(open({str(prefix / "lib.txt")!r}).read())
try:
    print(repr(open({str(prefix / "store.db")!r}).read()))
except OSError as exc:
    print(type(exc).__name__)
"""
        r = sandbox.run_python({"main.py": probe})
    lines = r.output.split()
    assert lines[0] == "library" and lines[1] in ("''", "PermissionError"), r.output


def test_a_tree_too_deep_to_recurse_into_is_cleaned_and_the_next_job_runs() -> None:
    """A QA pass (session 19): a job that left a directory 3,000 levels deep ended the sandbox in
    its clean-up (`shutil.rmtree` recursed past Python's limit) after its answer was sent, and the
    next job sent there, another run's, got an error verdict."""
    deep = (
        "import os\n"
        "os.chdir('/tmp')\n"
        "for _ in range(3000):\n"
        "    os.mkdir('d'); os.chdir('d')\n"
        "os.mkdir('locked'); os.chmod('locked', 0)\n"
        "print('built')\n"
    )
    with Sandbox(TIGHT, size=1) as one:
        assert run(one, deep).output.strip() == "built"
        after = run(one, "import os\nprint(sorted(os.listdir('/tmp')))\n")
    # A Python prefix under /tmp (a checkout there) is bind-mounted read-only: its top folder shows.
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    mount_points = sorted({Path(p).parts[2] for p in prefixes if Path(p).parts[1:2] == ("tmp",)})
    assert after.exit_code == 0 and after.output.strip() == repr(mount_points), after.output


def test_a_job_that_kills_its_sandbox_is_an_error_not_a_verdict(box: Sandbox) -> None:
    with pytest.raises(SandboxError):
        run(box, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert run(box, "print('fine')\n").output.strip() == "fine"


# -- TestSuite ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(box: Sandbox) -> TestSuite:
    return TestSuite(sandbox=box)


def test_testsuite_pass_fail_and_evidence(suite: TestSuite) -> None:
    good = suite.verify(
        traj("g", "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", tests=ADD_TESTS)
    )
    assert good.passed is True and good.score == 1.0 and good.evidence["tests"]["passed"] == 2
    bad = suite.verify(traj("b", "def add(a, b):\n    return a + b if a < 0 else a * b\n", tests=ADD_TESTS))
    assert bad.passed is False and bad.score == 0.5
    assert bad.evidence["failures"][0]["test"] == "test_solution.py::test_add"
    assert "assert 6 == 5" in bad.evidence["failures"][0]["message"]
    syntax = suite.verify(traj("s", "def add(a, b) return", tests=ADD_TESTS))
    assert syntax.passed is False and "could not be collected" in syntax.reason
    via_tool = tool_traj("t", "submit", {"code": "def add(a, b):\n    return b + a\n"}, tests=ADD_TESTS)
    assert TestSuite(tool="submit", arg="code", sandbox=suite.sandbox).verify(via_tool).passed is True
    # Code that is not text is the agent's failure to submit, not a verifier that cannot tell
    # (`label` ignores undecided verdicts: another verifier's pass would stand alone).
    not_code = tool_traj("n", "submit", {"code": ["def add(a, b): ..."]}, tests=ADD_TESTS)
    assert TestSuite(tool="submit", arg="code", sandbox=suite.sandbox).verify(not_code).passed is False


def test_testsuite_cannot_be_fooled_or_confused(suite: TestSuite) -> None:
    exits = suite.verify(traj("x", "import os\nos._exit(0)\n", tests=ADD_TESTS))
    # The code runs in a solution process of its own: its exit ends only that process.
    assert exits.passed is False and "the solution process stopped answering (exit code 0)" in exits.reason
    no_tests = suite.verify(traj("n", "def add(a, b): return a + b", tests="X = 1\n"))
    assert no_tests.passed is None and "no tests" in no_tests.reason
    assert suite.verify(traj("m", "def add(a, b): return a + b")).passed is None  # no metadata["tests"]
    assert suite.verify(traj("e", "", tests=ADD_TESTS)).passed is False
    assert suite.verify(traj("empty", None, steps=[], tests=ADD_TESTS)).passed is None


def test_hostile_agent_code_through_the_worker(
    box: Sandbox, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each attack's test asserts the attack worked: every verdict must be a fail, the worker must
    survive, the store must stay intact, and the sandbox must still pass honest code afterwards."""
    monkeypatch.setenv("HONED_TEST_SECRET", "hunter2-secret")
    secret_hash = hashlib.sha256(b"hunter2-secret").hexdigest()  # the test must not print the secret itself
    store = honed.open_store(sqlite_url)
    db = store.engine.url.database
    outside = tmp_path / "outside.txt"
    attacks = {
        "loop": ("while True:\n    pass\n", "import solution\n\ndef test_x():\n    assert True\n"),
        "fork-bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", "import solution\n\ndef test_x():\n    assert True\n"),
        "10GB": ("data = bytearray(10 * 1024**3)\n", "from solution import data\n\ndef test_x():\n    assert len(data) > 0\n"),
        "disk": ("def fill():\n    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20))\n", "from solution import fill\n\ndef test_x():\n    fill()\n"),
        "outside": ("def escape(path):\n    open(path, 'w').write('pwned')\n    return open(path).read()\n", f"from solution import escape\n\ndef test_x():\n    assert escape({str(outside)!r}) == 'pwned'\n"),
        "socket": ("import socket\n\ndef reach():\n    socket.create_connection(('127.0.0.1', 5432), timeout=1).close()\n    return True\n", "from solution import reach\n\ndef test_x():\n    assert reach()\n"),
        "secret": ("import os\nSECRET = os.environ.get('HONED_TEST_SECRET')\n", f"import hashlib\nfrom solution import SECRET\n\ndef test_x():\n    assert hashlib.sha256(str(SECRET).encode()).hexdigest() == {secret_hash!r}\n"),
        "store-file": ("def steal(path):\n    return open(path, 'rb').read(16)\n", f"from solution import steal\n\ndef test_x():\n    assert steal({db!r}).startswith(b'SQLite format 3')\n"),
    }  # fmt: skip
    for name, (code, tests) in attacks.items():
        store.save(traj(name, f"```python\n{code}```", tests=tests))
    store.save(traj("honest", "def add(a, b):\n    return a + b\n", tests=ADD_TESTS))

    worker = Worker(store, [TestSuite(sandbox=box)], concurrency=2, timeout_s=20)
    assert worker.run_once() == len(attacks) + 1
    verdicts = {t.id: t.verdicts[0] for t in store.trajectories(limit=None)}
    assert verdicts.pop("honest").passed is True  # the sandbox still works after all that
    assert {name: v.passed for name, v in verdicts.items()} == dict.fromkeys(attacks, False)
    assert verdicts["loop"].evidence["limit"] == "wall" and verdicts["10GB"].evidence["limit"] == "memory"
    assert (
        verdicts["disk"].evidence["limit"] == "file_size"
        and verdicts["fork-bomb"].evidence["limit"] == "wall"
    )
    for name, error in (
        ("socket", "ConnectionRefusedError"),
        ("outside", "FileNotFoundError"),
        ("store-file", "FileNotFoundError"),
    ):
        assert error in verdicts[name].evidence["output"], (name, verdicts[name].evidence["output"])
    assert "AssertionError" in verdicts["secret"].evidence["output"]
    assert "hunter2" not in json.dumps([v.to_dict() for v in verdicts.values()])
    assert not outside.exists()
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    assert store.count() == len(attacks) + 1 and worker.stats.errors == 0
    assert os.path.getsize(db) > 0


def test_the_unsandboxed_fallback_still_bounds_time_and_cleans_up() -> None:
    """backend="none" is for trusted code only, but it must never signal anything beyond its job."""
    marker = "31.4159"
    with Sandbox(Limits(wall_s=1.5, cpu_s=3, memory_mb=512), size=1, backend="none") as sandbox:
        ok = sandbox.run_pytest(
            {"solution.py": "def add(a, b):\n    return a + b\n", "test_solution.py": ADD_TESTS}
        )
        assert ok.passed, ok.output
        slow = sandbox.run_python(
            {
                "main.py": f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nwhile True:\n    pass\n"
            }
        )
        assert slow.timed_out
    time.sleep(0.1)
    sleepers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"sleep" in cmdline:
            sleepers.append(pid)
    assert not sleepers  # its process group went with it
