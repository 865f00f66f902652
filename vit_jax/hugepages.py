"""Transparent huge pages for the host memory XLA:CPU allocates every step, through glibc's malloc tunable.

XLA:CPU allocates a step's temporaries as one block (1.5 GB for a ViT-B/16 batch-8 float32 train step) with
malloc; glibc serves a block that large with a fresh `mmap` and gives it back with `munmap`, so every step faults
it in again 4 KB at a time: ~400,000 page faults and 0.6 s of kernel time per 2.7 s step on a 2-core machine.
With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on those
maps (`madvise(MADV_HUGEPAGE)`), which the kernel honours when
/sys/kernel/mm/transparent_hugepage/enabled is `madvise` (with `always` it uses them anyway): ~1,300 faults of
2 MB, and the step ~10% faster. glibc reads the tunable only when a process starts, so the `python -m vit_jax.*`
commands (`vit_jax.cli.run`) and the benchmarks start themselves again once with it set, before any work
(silently).
`VIT_JAX_HUGEPAGES=0` (or false, no, off) turns that off; a `glibc.malloc.hugetlb` already in GLIBC_TUNABLES is
left as it is. Only CPU runs restart: not on a host with a TPU or NVIDIA GPU (device files), unless JAX_PLATFORMS
puts cpu first.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Mapping

from vit_jax.errors import UserError

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VIT_JAX_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def wanted(env: Mapping[str, str]) -> bool:
    """Whether VIT_JAX_HUGEPAGES allows the restart: 0, false, no, off (any case) turn it off; 1, true, yes, on or
    no value leave it on. UserError for anything else: a misspelt opt-out must not quietly leave it on."""
    value = env.get(OPT_OUT, "")
    word = value.strip().lower()
    if word in _OFF:
        return False
    if word in _ON:
        return True
    raise UserError(f"{OPT_OUT}={value!r} is invalid: expected 0, false, no or off (no huge-page restart), or 1, "
                    "true, yes or on (the default)")


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`: the bracketed word), or None."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in words if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...] | None:
    name, version = libc
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def accelerator_present() -> bool:
    """Whether this host has a TPU (/dev/accel*, /dev/vfio/<n>), an NVIDIA GPU (/dev/nvidia<n>) or an AMD GPU
    (/dev/kfd, ROCm's compute device)."""
    return any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*",
                                                  "/dev/kfd"))


def cpu_run(env: Mapping[str, str], accelerator: bool) -> bool:
    """Whether jax will compute on the CPU: JAX_PLATFORMS's first platform, else whether there is no accelerator."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return platforms[0] == "cpu" if platforms else not accelerator


def environment(env: Mapping[str, str], libc: tuple[str, str], thp: str | None,
                accelerator: bool = False) -> dict[str, str] | None:
    """`env` with the tunable added, or None when a restart would change nothing or is not wanted.

    None without glibc >= 2.35 (`libc`: `platform.libc_ver()`), when the kernel's THP mode (`thp`: `thp_mode()`)
    is not `madvise`, when the tunable is already there (or another value of it), when VIT_JAX_HUGEPAGES turns
    it off (`wanted`, which raises UserError for a value it does not know), or when jax will not compute on the CPU
    (`cpu_run`; `accelerator`: `accelerator_present()`).
    """
    version = _glibc_version(libc)
    tunables = env.get("GLIBC_TUNABLES", "")
    if (not wanted(env) or version is None or version < _MIN_GLIBC or thp != "madvise"
            or "glibc.malloc.hugetlb" in tunables or not cpu_run(env, accelerator)):
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_hugepages() -> None:
    """Re-execute this process (same interpreter, same command line) with the tunable set, if that helps.

    Returns only when nothing is to be done; call it first thing in a command's `__main__`. Silent: a command's
    bad input stays one line on stderr; the benchmarks print the GLIBC_TUNABLES they ran with. UserError for a
    VIT_JAX_HUGEPAGES value `wanted` does not know.
    """
    env = environment(os.environ, platform.libc_ver(), thp_mode(), accelerator_present())
    argv = getattr(sys, "orig_argv", None)
    if env is None or not sys.executable or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(argv), env)
