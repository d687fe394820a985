#!/usr/bin/env python3
"""Prove the board path without a board: edge-cbn's runtime-only install runs `edge-cbn stream` under an
emulated 64-bit Raspberry Pi OS userland, and its predictions, refold count and calibrated statistics
equal the x86-64 run of the same command.

64-bit Raspberry Pi OS (bookworm) is Debian bookworm arm64 with Python 3.11, so on a Debian x86-64 machine:
1. qemu-user-static (apt) runs aarch64 programs in user mode, no root filesystem image or binfmt needed;
2. Debian's arm64 python3.11 and the C libraries it needs (`apt-get download`, `dpkg -x`) make a sysroot;
3. the project's wheel and its runtime dependencies, chosen by pip for manylinux aarch64 + CPython 3.11 as
   `device/install.sh` on the board would get them (no TensorFlow), go into a site folder;
4. a small model is exported here (TensorFlow, x86-64) and both sides run the same stream over the same
   frames with a fixed calibration cadence (`--calibrate-every`), so the runs are deterministic;
5. the per-frame predictions, refolds and the saved calibrated statistics are compared.

Everything downloaded is cached in --cache, so a second run is fast and needs no registry.
Exit status 0 when the two runs agree, 1 when they do not, 2 when the check could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "device" / "constraints.txt"  # the pins device/install.sh installs on a 64-bit board
ROOT_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "zlib1g"]
NOT_NEEDED = {"dpkg", "install-info", "tar"}  # tools that the recursive dependencies drag in
# pip on the board (glibc 2.36) accepts manylinux wheels up to 2_36: list every tag, as it would.
PLATFORMS = ["manylinux2014_aarch64", "linux_aarch64"] + [f"manylinux_2_{g}_aarch64" for g in range(17, 37)]
# 32-bit Raspberry Pi OS: what pyproject.toml installs there, and the tags pip on that board accepts.
ARMV7L_NEEDS = ["tflite-runtime", "numpy<2", "opencv-python-headless"]
ARMV7L_PLATFORMS = ["manylinux2014_armv7l", "linux_armv7l"] + [f"manylinux_2_{g}_armv7l" for g in range(17, 37)]
STREAM = ["stream", "--headless", "--quiet", "--noise", "relative", "--eta", "0.05", "--calibrate",
          "--calibrate-every", "2", "--stages", "4", "--refold-every", "2", "--track-every", "2",
          "--num-threads", "1", "--agreement-every", "0", "--save-interval", "0"]


# qemu-user shows the program the host's /proc/cpuinfo, where LiteRT's CPU detection (cpuinfo) finds no
# ARM core and crashes (ai-edge-litert 2.3: SIGSEGV in Interpreter()); the sysroot holds a Raspberry Pi 4's
# instead, and qemu serves files under its -L prefix first.
PI4_CORE = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n")
PI4_CPUINFO = "".join(PI4_CORE.format(i=i) for i in range(4)) + "Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n"


class CheckError(Exception):
    """The check could not run (exit 2), as opposed to the runs disagreeing (exit 1)."""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    line = " ".join(str(c) for c in cmd)
    print("+ " + (line if len(line) <= 200 else line[:197] + "..."), flush=True)
    done = subprocess.run([str(c) for c in cmd], **kwargs)
    if done.returncode != 0:
        raise CheckError(f"{Path(str(cmd[0])).name} failed (exit {done.returncode})")
    return done


def platform_flags(platforms) -> list[str]:
    """pip's `--platform TAG` for each tag."""
    return [flag for tag in platforms for flag in ("--platform", tag)]


def ensure_qemu() -> str:
    if not shutil.which("qemu-aarch64-static"):
        run(["apt-get", "update", "-q"])  # a fresh machine may have no package lists yet
        run(["apt-get", "install", "-y", "-q", "qemu-user-static"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("qemu-aarch64-static")


def arm64_packages() -> list[str]:
    """The arm64 packages Python 3.11 needs: the roots and their dependencies, recursively."""
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in arches.split():
        run(["dpkg", "--add-architecture", "arm64"])
        run(["apt-get", "update", "-q"])
    deps = run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", *[f"{p}:arm64" for p in ROOT_PACKAGES]],
               capture_output=True, text=True).stdout
    names = {line for line in deps.splitlines() if line[:1].isalnum() and line.endswith(":arm64")}  # not "  Depends:"
    return sorted(n for n in names if n.split(":")[0] not in NOT_NEEDED)


def sysroot(cache: Path) -> Path:
    """Debian bookworm arm64 Python 3.11, unpacked (and its .debs kept) in the cache, with a Pi 4's
    /proc/cpuinfo."""
    root = cache / "sysroot"
    if not (root / "usr/bin/python3.11").is_file():
        unpack_python(cache, root)
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text(PI4_CPUINFO)
    return root


def unpack_python(cache: Path, root: Path) -> None:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    packages = arm64_packages()
    if not packages:
        raise CheckError("apt found no arm64 packages for python3.11 (not a Debian bookworm machine?)")
    run(["apt-get", "download", "-q", *packages], cwd=debs)
    tmp = cache / "sysroot.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for deb in sorted(debs.glob("*_arm64.deb")):
        run(["dpkg-deb", "-x", deb, tmp], stdout=subprocess.DEVNULL)
    tmp.rename(root)


def board_site(cache: Path) -> Path:
    """The project's wheel and its runtime dependencies for the board, installed into a site folder."""
    wheels, site = cache / "wheels", cache / "site"
    project = cache / "project"
    shutil.rmtree(project, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", project, REPO])
    (wheel,) = project.glob("edge_cbn-*.whl")
    pick = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", *platform_flags(PLATFORMS), "-d", wheels,
            "--find-links", wheels, "--constraint", CONSTRAINTS, wheel]
    try:  # from the cache alone first: a second run needs no registry
        run(pick + ["--no-index"], stderr=subprocess.DEVNULL)
    except CheckError:
        run(pick)
    shutil.rmtree(site, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.11", "--implementation", "cp", *platform_flags(PLATFORMS), "--target", site,
         wheel, *sorted(p for p in wheels.glob("*.whl") if needed(p, wheels) and not p.name.startswith("edge_cbn-"))])
    return site


def pinned() -> dict[str, str]:
    """{distribution name as wheel files spell it: version} of device/constraints.txt."""
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    return dict((name.lower().replace("-", "_"), version) for name, version in
                (line.split("==") for line in lines if line))


def needed(path: Path, wheels: Path) -> bool:
    """The pinned version of each distribution goes in, or, for one the pins do not name, the newest
    downloaded (an old cache may hold more)."""
    name = path.name.split("-")[0].lower()
    if name in pinned():
        return path.name.split("-")[1] == pinned()[name]
    versions = sorted((p for p in wheels.glob("*.whl") if p.name.split("-")[0].lower() == name),
                      key=lambda p: [int(v) if v.isdigit() else 0 for v in p.name.split("-")[1].split(".")])
    return path == versions[-1]


def small_model_and_frames(work: Path, frames: int) -> tuple[Path, Path]:
    """A small exported model (EfficientNet-Lite0 with its real ImageNet weights at 64x64: confident,
    distinct predictions at a fraction of the emulated cost of 224x224) and JPEG frames of the bundled
    sample clip."""
    import cv2

    model = work / "small.tflite"
    if not model.is_file():
        run([sys.executable, REPO / "tools/convert.py", "--model", "efficientnet_lite0", "--input-size", "64",
             "--quiet", "-o", model])
    folder = work / "frames"
    folder.mkdir(exist_ok=True)
    cap = cv2.VideoCapture(str(REPO / "edge_cbn/stream/static/sample.mp4"))
    for i in range(frames):
        ok, frame = cap.read()
        if not ok:
            raise CheckError("cannot read the bundled sample clip")
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), frame)
    cap.release()
    return model, folder


def stream(python: list, env: dict, model: Path, frames: Path, n: int, seed: int, out: Path) -> dict:
    """One run of the stream; {"frames": per-frame log lines, "summary": ..., "stats": {key: array}}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run([*python, "-c", "from edge_cbn.cli import main; main()", *STREAM, "--model", model, "--images", frames,
         "--frames", n, "--seed", seed, "--state", out / "state.npz", "--log", out / "log.jsonl"],
        env=env, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    with np.load(out / "state.npz") as z:
        stats = {k[len("stats/"):-len("/mean")]: (z[k], z[k[:-len("mean")] + "var"])
                 for k in z.files if k.startswith("stats/") and k.endswith("/mean")}
    return {"frames": [x for x in lines if "frame" in x], "summary": lines[-1]["summary"], "stats": stats}


def differences(x86: dict, board: dict, rtol: float = 1e-4) -> tuple[list[str], float]:
    """What differs between the runs (empty: equal), and the relative difference of the calibrated
    statistics (`edge_cbn.lab.bench.statistics.relative_difference`).  XNNPACK's ARM and x86 kernels sum in
    other orders, so float32 activations differ in their last bits, and the statistics of a few frames by
    more (1.8e-5 on Lite0); another chip's differ by far more."""
    from edge_cbn.lab.bench.statistics import relative_difference

    diffs = []
    if len(x86["frames"]) != len(board["frames"]):
        diffs.append(f"{len(x86['frames'])} frames on x86-64, {len(board['frames'])} on the board")
    for a, b in zip(x86["frames"], board["frames"]):
        if a["top"][0] != b["top"][0] or abs(a["top"][1] - b["top"][1]) > 1e-3:
            diffs.append(f"frame {a['frame']}: {a['top']} on x86-64, {b['top']} on the board")
        if (a["calibrating"], a["refolds"]) != (b["calibrating"], b["refolds"]):
            diffs.append(f"frame {a['frame']}: calibration schedule differs")
    if x86["summary"]["refolds"] != board["summary"]["refolds"]:
        diffs.append(f"{x86['summary']['refolds']} refolds on x86-64, {board['summary']['refolds']} on the board")
    worst = relative_difference(board["stats"], x86["stats"])
    if not worst <= rtol:
        diffs.append(f"calibrated statistics: relative difference {worst:.2g} > {rtol:g}")
    return diffs, worst


def armv7l_report(cache: Path) -> int:
    """Whether the runtime's dependencies have armv7l wheels for Python 3.11 (exit 1 when some do not)."""
    missing = []
    for requirement in ARMV7L_NEEDS:
        try:
            run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                 "3.11", *platform_flags(ARMV7L_PLATFORMS), "-d", cache / "armv7l",
                 requirement], stderr=subprocess.DEVNULL)
        except CheckError:
            missing.append(requirement)
    if missing:
        print(f"armv7l (32-bit Raspberry Pi OS), Python 3.11: no wheel for {', '.join(missing)}")
        return 1
    print("armv7l (32-bit Raspberry Pi OS), Python 3.11: every runtime dependency has a wheel")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("64-bit"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_default = Path(os.environ.get("EDGE_CBN_CACHE", Path.home() / ".cache/edge-cbn")) / "board"
    parser.add_argument("--cache", type=Path, default=cache_default,
                        help="downloads and the sysroot (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="stream frames on each side (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="chip seed of both runs (default: %(default)s)")
    parser.add_argument("--board-seed", type=int, help="another chip seed on the board only: the check must fail")
    parser.add_argument("--armv7l", action="store_true",
                        help="only ask the package index whether the 32-bit board's dependencies have wheels")
    args = parser.parse_args(argv)
    try:
        return armv7l_report(args.cache.resolve()) if args.armv7l else check(args)
    except CheckError as e:
        print(f"board check could not run: {e}", file=sys.stderr)
        return 2


def check(args) -> int:
    cache = args.cache.resolve()
    qemu = ensure_qemu()
    root, site = sysroot(cache), board_site(cache)
    work = cache / "run"
    work.mkdir(parents=True, exist_ok=True)
    model, frames = small_model_and_frames(work, args.frames)
    python = [qemu, "-L", root, root / "usr/bin/python3.11"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
           "EDGE_CBN_CACHE": str(work / "cache"), "LC_ALL": "C.UTF-8"}
    machine = run([*python, "-c", "import platform; print(platform.machine())"], env=env, capture_output=True,
                  text=True).stdout.strip()
    print(f"emulated board: platform.machine() = {machine}")
    installed = sorted(p.name.split("-")[0] for p in site.glob("*.dist-info"))
    print(f"installed on the board: {', '.join(installed)}")
    if any(name.lower().startswith(("tensorflow", "keras")) for name in installed):
        print("FAIL: the runtime-only install pulled in TensorFlow")
        return 1
    here = dict(os.environ, EDGE_CBN_CACHE=str(work / "cache"), PYTHONPATH=str(REPO))
    x86 = stream([sys.executable], here, model, frames, args.frames, args.seed, work / "x86_64")
    board_seed = args.seed if args.board_seed is None else args.board_seed
    board = stream(python, env, model, frames, args.frames, board_seed, work / machine)
    diffs, worst = differences(x86, board)
    if diffs or machine != "aarch64":
        print(f"FAIL: the {machine} run differs from x86-64:\n  " + "\n  ".join(diffs or ["not aarch64"]))
        return 1
    print(f"equal to x86-64: {len(x86['frames'])} frames' predictions, {x86['summary']['refolds']} refolds, "
          f"{len(x86['stats'])} BN layers' calibrated statistics (relative difference {worst:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
