"""vit_jax.hugepages: when the commands restart with glibc's huge-page tunable, and that it takes effect."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vit_jax import hugepages

GLIBC = ("glibc", "2.36")


def test_adds_the_tunable_where_it_helps():
    env = hugepages.environment({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_other_tunables():
    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("env, libc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's own choice stays
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise"),  # already restarted: no loop
    ({"VIT_JAX_HUGEPAGES": "0"}, GLIBC, "madvise"),                    # opted out
    ({}, ("glibc", "2.31"), "madvise"),                                # glibc without the tunable
    ({}, ("", ""), "madvise"),                                         # not glibc (musl, macOS)
    ({}, GLIBC, "always"),                                             # the kernel uses huge pages anyway
    ({}, GLIBC, "never"),                                              # ... or never
    ({}, GLIBC, None),                                                 # no THP in this kernel
])
def test_no_restart_when_it_would_change_nothing(env, libc, thp):
    assert hugepages.environment(env, libc, thp) is None


@pytest.mark.parametrize("platforms, accelerator, restarts", [
    ("", False, True), ("", True, False),  # a TPU / GPU host computes there: its path is left alone
    ("cpu", True, True), ("tpu,cpu", True, False), ("cuda", False, False), (" cpu , cuda", True, True)])
def test_only_cpu_runs_restart(platforms, accelerator, restarts):
    env = {"JAX_PLATFORMS": platforms} if platforms else {}
    assert (hugepages.environment(env, GLIBC, "madvise", accelerator) is not None) == restarts


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


_PROBE = textwrap.dedent("""
    import ctypes, os, resource
    from vit_jax import cli

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def main(argv):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):  # 256 MiB from malloc (numpy would madvise by itself), written, freed, as XLA's temps
            block = libc.malloc(1 << 28)
            ctypes.memset(block, 1, 1 << 28)
            libc.free(block)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(os.environ.get("GLIBC_TUNABLES", "-"), faults)

    cli.run(main)
""")


def _probe(**env: str) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)} | env
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tunables, faults = result.stdout.split()
    return tunables, int(faults), result.stderr


_SUPPORTED = hugepages.environment({}, platform.libc_ver(), hugepages.thp_mode(),
                                  hugepages.accelerator_present()) is not None


@pytest.mark.skipif(not _SUPPORTED, reason="glibc < 2.35, THP mode not madvise, or an accelerator")
def test_a_command_restarts_with_huge_pages_and_faults_far_less():
    tunables, faults, stderr = _probe()
    assert tunables == "glibc.malloc.hugetlb=1"
    assert stderr == ""  # silent: a command's bad input stays one line on stderr
    plain_tunables, plain_faults, _ = _probe(VIT_JAX_HUGEPAGES="0")
    assert plain_tunables == "-"
    # 2 x 256 MiB in 4 KiB pages: 131,072 faults; in 2 MiB pages: 256 (plus the odd small page).
    assert plain_faults > 100_000
    assert faults < plain_faults / 20


@pytest.mark.parametrize("device, present", [
    ("/dev/accel0", True), ("/dev/vfio/0", True), ("/dev/nvidia0", True), ("/dev/kfd", True),
    ("/dev/nvidiactl", False), ("/dev/vfio/vfio", False), (None, False)])
def test_accelerator_device_files(monkeypatch, device, present):
    import fnmatch

    monkeypatch.setattr(hugepages.glob, "glob",
                        lambda pattern: [device] if device and fnmatch.fnmatch(device, pattern) else [])
    assert hugepages.accelerator_present() is present


@pytest.mark.parametrize("value, restarts", [
    ("0", False), ("false", False), ("No", False), ("OFF", False), (" off ", False),
    ("1", True), ("true", True), ("Yes", True), ("on", True), ("", True)])
def test_the_opt_out_takes_the_usual_words_for_off_and_on(value, restarts):
    """Only VIT_JAX_HUGEPAGES=0 turned the restart off: false, no or off left it on."""
    assert (hugepages.environment({hugepages.OPT_OUT: value}, GLIBC, "madvise") is not None) == restarts


def test_an_unknown_opt_out_value_is_one_error_line():
    """A misspelt opt-out must not quietly leave the restart on: the command stops, naming the value."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {hugepages.OPT_OUT: "disabled"}
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: VIT_JAX_HUGEPAGES='disabled' is invalid: expected 0, false, no or off (no huge-page restart), or 1, "
        "true, yes or on (the default)"]
