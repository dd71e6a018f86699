"""A tiny seccomp filter for the sandbox: no new namespaces, nothing kept in the kernel between jobs.

Why: inside a user namespace of its own, unprivileged code is "root" enough to mount a tmpfs with no
size limit and fill memory, or to escape RLIMIT-based accounting. bubblewrap loads this program
(`--seccomp FD`) right before it runs the sandboxed command. Everything else is allowed: the
rlimits, namespaces and read-only mounts do the rest.

The program is classic BPF over `struct seccomp_data` (nr at offset 0, arch at 4, args at 16):
`unshare` and `setns` fail with EPERM, `clone` with CLONE_NEWUSER fails with EPERM, `clone3`
fails with ENOSYS (its flags live in memory BPF cannot read; libc then falls back to `clone`),
POSIX message queues and kernel keyrings fail with EPERM (they outlive a job), and foreign-ABI
calls (i386 or x32 on x86-64) fail with ENOSYS.
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

# machine -> (AUDIT_ARCH, {syscall: nr}, checks x32)
_ARCHES: dict[str, tuple[int, dict[str, int], bool]] = {
    "x86_64": (
        0xC000003E,
        {"unshare": 272, "setns": 308, "clone": 56, "clone3": 435,
         "mq_open": 240, "mq_unlink": 241, "add_key": 248, "request_key": 249, "keyctl": 250},
        True,
    ),
    "aarch64": (
        0xC00000B7,
        {"unshare": 97, "setns": 268, "clone": 220, "clone3": 435,
         "mq_open": 180, "mq_unlink": 181, "add_key": 217, "request_key": 218, "keyctl": 219},
        False,
    ),
}  # fmt: skip
# Kernel objects that outlive a job and are not files the sandbox removes: a POSIX message queue
# (in the sandbox's IPC namespace, never unlinked) and the kernel keyrings (charged to the sandbox's
# uid, on the host when the worker runs as root): one job could hand data to the next.
_NO_LEFTOVERS = ("mq_open", "mq_unlink", "add_key", "request_key", "keyctl")


def no_new_namespaces_filter(machine: str | None = None) -> bytes | None:
    """The compiled filter for this machine's architecture, or None where it is not known."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, nr, x32 = arch
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    # (code, jt label, jf label, k); labels resolve to relative jumps below.
    program: list[tuple[int, str | None, str | None, int]] = [
        (_LD_W_ABS, None, None, 4),
        (_JEQ, None, "enosys", audit_arch),
        (_LD_W_ABS, None, None, 0),
    ]
    if x32:
        program.append((_JGE, "enosys", None, _X32_BIT))
    program += [(_JEQ, "eperm", None, nr[name]) for name in _NO_LEFTOVERS]
    program += [
        (_JEQ, "eperm", None, nr["unshare"]),
        (_JEQ, "eperm", None, nr["setns"]),
        (_JEQ, "enosys", None, nr["clone3"]),
        (_JEQ, None, "allow", nr["clone"]),
        (_LD_W_ABS, None, None, 16),  # clone's flags: the low 32 bits of args[0]
        (_JSET, "eperm", "allow", _CLONE_NEWUSER),
    ]
    tail = {"allow": _ALLOW, "eperm": eperm, "enosys": enosys}
    labels = {name: len(program) + i for i, name in enumerate(tail)}
    out = bytearray()
    for index, (code, jt, jf, k) in enumerate(program):
        out += struct.pack(
            "=HBBI", code, labels[jt] - index - 1 if jt else 0, labels[jf] - index - 1 if jf else 0, k
        )
    for value in tail.values():
        out += struct.pack("=HBBI", _RET, 0, 0, value)
    return bytes(out)
