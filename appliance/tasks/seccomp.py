"""The seccomp filter jobs run under: system calls a job never needs fail with EPERM.

The deny-list follows Flatpak's and Docker's defaults: the kernel keyring (not namespaced),
perf, BPF, userfaultfd and io_uring (frequent sources of kernel bugs), ptrace, modules, kexec,
reboot, swap, clocks, accounting, quotas, mounts and namespaces (the job has no capabilities for
them anyway: a second wall), file handles (``open_by_handle_at`` reaches outside a bind mount),
``syslog`` and NUMA page moves (they leak other processes' layout).

The filter is classic BPF, written here (bubblewrap loads it with ``--seccomp FD``): only for
x86_64, where the numbers below hold; other machines run jobs without one, and
``Sandbox.capabilities()`` says so. A call made through another ABI (i386's ``int 0x80``, x32)
fails with ENOSYS, since the numbers differ there.

Imports: the standard library only.
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["DENIED_X86_64", "filter_program"]

# System call numbers from the kernel's arch/x86/entry/syscalls/syscall_64.tbl.
DENIED_X86_64 = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "pivot_root": 155,
    "adjtimex": 159,
    "chroot": 161,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "migrate_pages": 256,
    "unshare": 272,
    "move_pages": 279,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
# struct seccomp_data: int nr; __u32 arch; ...
_NR_OFFSET = 0
_ARCH_OFFSET = 4
# Classic BPF opcodes
_LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JUMP_IF_AT_LEAST = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K
# Seccomp verdicts
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000


def _instruction(code: int, k: int, *, if_true: int = 0, if_false: int = 0) -> bytes:
    """One ``struct sock_filter``: jumps count the instructions skipped."""
    return struct.pack("=HBBI", code, if_true, if_false, k)


def filter_program() -> bytes | None:
    """The filter as bubblewrap's ``--seccomp`` reads it, or None where there is none for this machine."""
    if platform.machine() != "x86_64":
        return None
    denied = sorted(DENIED_X86_64.values())
    # Layout: check the ABI, load the number, one test per denied call, allow, deny, wrong ABI.
    program = [
        _instruction(_LOAD_WORD, _ARCH_OFFSET),
        # the last instruction answers a call from another ABI
        _instruction(_JUMP_IF_EQUAL, _AUDIT_ARCH_X86_64, if_false=len(denied) + 4),
        _instruction(_LOAD_WORD, _NR_OFFSET),
        _instruction(_JUMP_IF_AT_LEAST, _X32_SYSCALL_BIT, if_true=len(denied) + 2),
    ]
    for index, number in enumerate(denied):
        program.append(_instruction(_JUMP_IF_EQUAL, number, if_true=len(denied) - index))
    program += [
        _instruction(_RETURN, _ALLOW),
        _instruction(_RETURN, _ERRNO | errno.EPERM),
        _instruction(_RETURN, _ERRNO | errno.ENOSYS),
    ]
    return b"".join(program)
