"""eyed on ARM64, a Raspberry Pi's instruction set, under QEMU's user-mode emulation: does it install without
torch, does the daemon run, and does it label frames as it does on this x86-64 machine?

Builds a Debian arm64 root once (debootstrap), installs eyed[onnx,replay] from this checkout into a venv
there (aarch64 wheels from PyPI, no torch), and exports two files here, as a user would before copying them
to a board: the FP32 export and `eyed export --int8 --target-cpu aarch64`. Then, for each emulated CPU
(--cpus: a Pi 4's Cortex-A72, which lacks the dot-product instructions and would fault on one, and a Pi 5's
Cortex-A76, which has them):

- replays --frames held-out CIFAR-10 records (from record --skip) through the daemon (`eyed run`) with each
  file, in the arm64 root and here, collects every label event with a SUB socket on this host, and compares
  the runs frame by frame: ImageNet top-1 class, coarse label, top-1 score, coarse accuracy; and lists every
  warning or error either daemon logged;
- tells where differences come from: digests of the resized frames (identical or not), and both files' logits
  on synthetic frames made at the model's size by numpy (the same bytes on both machines, so only onnxruntime's
  kernels differ).

Emulation runs onnxruntime's ARM64 kernels instruction by instruction, so the results are what an ARM64 CPU
computes, but its timings say nothing about a Pi and are not reported.

Needs root (chroot, bind mounts), Debian's qemu-user-static and debootstrap with the aarch64 binfmt handler
registered, and the Debian and PyPI registries:

    sudo apt-get install qemu-user-static binfmt-support debootstrap
    .venv/bin/python benchmarks/arm64_qemu.py [--frames 200] [--root /var/tmp/eyed-arm64] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eyed.subscriber import Subscriber

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"  # Raspberry Pi OS's base: Python 3.11
VENV = "/opt/eyed"
# Inside the arm64 root: this checkout's wheel, the shared data (read-only), the model files.
WHEELS, SHARED, MODELS = "/mnt/wheels", "/mnt/shared", "/mnt/models"
PORTS = {"arm64": 5591, "x86_64": 5592}
SYNTHETIC_FRAMES = 50
EVENT_TIMEOUT_S = 600.0
# Looked up here: the environment given to commands in the root has its own PATH.
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)


def ensure_root(root: Path) -> None:
    """A minimal Debian arm64 root with Python, made once."""
    if (root / "usr/bin/python3").exists():
        return
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        raise SystemExit(
            "no binfmt handler for aarch64: apt-get install qemu-user-static binfmt-support (in a container, first "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc, then update-binfmts --enable qemu-aarch64)"
        )
    print(f"debootstrap {SUITE} arm64 into {root} (a few minutes)", file=sys.stderr)
    sh(["debootstrap", "--arch=arm64", "--include=python3,python3-venv,ca-certificates", SUITE, str(root), MIRROR])


@contextlib.contextmanager
def mounted(root: Path, shared: Path, wheels: Path, models: Path) -> Iterator[None]:
    """/proc, /dev, the wheel, the data and the models bind-mounted into ``root``; unmounted after.

    Not /sys: it describes this x86-64 CPU, and onnxruntime's CPU detection, reading it together with the
    x86-64 /proc/cpuinfo, crashes (SIGSEGV on import). Without it, detection fails and onnxruntime warns and
    falls back on what the CPU reports of itself."""
    binds = [("/proc", "proc"), ("/dev", "dev"), (wheels, WHEELS), (shared, SHARED), (models, MODELS)]
    done: list[Path] = []
    try:
        for src, dst in binds:
            target = root / str(dst).lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            sh(["mount", "--rbind" if str(src) == "/dev" else "--bind", str(src), str(target)])
            done.append(target)
            # Where mounts are shared (systemd's default), unmounting the copy of /dev's submounts would
            # otherwise unmount the host's own /dev/pts and /dev/shm.
            sh(["mount", "--make-rslave", str(target)])
            if src == shared:
                sh(["mount", "-o", "remount,bind,ro", str(target)])
        # Name resolution and the host's certificate bundle (which may hold a proxy's CA) for pip.
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/host-ca.crt")
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "--recursive", str(target)], check=False)


def in_root(root: Path, cmd: list[str], cpu: str = "max", **kw: Any) -> subprocess.Popen[str]:
    env = {
        "QEMU_CPU": cpu,
        "PATH": f"{VENV}/bin:/usr/bin:/bin",
        "HOME": "/root",
        "PIP_CERT": "/etc/ssl/certs/host-ca.crt",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen([CHROOT, str(root), *cmd], env=env, text=True, **kw)


def install(root: Path, wheel: Path) -> dict[str, Any]:
    """eyed[onnx,replay] into a venv in the root; what was installed, and whether torch can be imported."""
    pip, target = f"{VENV}/bin/pip", f"{WHEELS}/{wheel.name}"
    steps = [
        ["python3", "-m", "venv", VENV],
        [pip, "install", "--quiet", f"{target}[onnx,replay]"],
        # The checkout's code even when a wheel of the same version was installed before.
        [pip, "install", "--quiet", "--force-reinstall", "--no-deps", target],
    ]
    for cmd in steps:
        if in_root(root, cmd).wait() != 0:
            raise SystemExit(f"in the arm64 root, {' '.join(cmd)} failed")
    probe = (
        "import importlib.util, platform, onnxruntime, cv2, numpy, zmq, pyarrow;"
        "print(platform.machine(), onnxruntime.__version__, cv2.__version__, numpy.__version__,"
        " importlib.util.find_spec('torch') is not None)"
    )
    out = in_root(root, [f"{VENV}/bin/python", "-c", probe], stdout=subprocess.PIPE).communicate()[0].split()
    return {"machine": out[0], "onnxruntime": out[1], "opencv": out[2], "numpy": out[3], "torch": out[4] == "True"}


def labels_of(daemon: subprocess.Popen[str], endpoint: str, frames: int) -> dict[int, dict[str, Any]]:
    """Every label event of one daemon run, by frame index; an error if the daemon ends without sending them
    all, or sends none for EVENT_TIMEOUT_S (emulated, the first comes after tens of seconds)."""
    got: dict[int, dict[str, Any]] = {}
    last = time.monotonic()
    with Subscriber(endpoint, ("label.",)) as sub:
        while len(got) < frames:
            try:
                _, event = sub.receive(1.0)
            except TimeoutError:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited {daemon.returncode} after {len(got)} events") from None
                if time.monotonic() - last > EVENT_TIMEOUT_S:
                    raise
                continue
            got[event["frame"]] = event
            last = time.monotonic()
    return got


# What QEMU's emulation makes onnxruntime print (no /sys to read the CPU from): not eyed's, nor a Pi's.
EMULATION_NOISE = ("cpuinfo",)
# eyed's log lines at INFO ("2026-11-24 13:05:29,123 INFO eyed.pipeline: ...").
INFO = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ")


def run_daemon(
    where: str, root: Path, model: str, data: str, skip: int, frames: int, cpu: str = ""
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Replay ``frames`` records from ``skip`` on through the daemon with ``model``, in the arm64 root (QEMU
    emulating ``cpu``) or here: its label events by frame, and what else it wrote to stderr (every line but
    eyed's INFO ones), emulation noise apart."""
    endpoint = f"tcp://127.0.0.1:{PORTS[where]}"
    config = "configs/replay.toml" if where == "x86_64" else f"{WHEELS}/replay.toml"
    settings = {
        "source.dataset": data,
        "source.skip": skip,
        "source.limit": frames,
        "model.onnx": model,
        "publish.endpoint": endpoint,
        "publish.wait_subscribers": 1,
    }
    args = ["run", "--config", config, *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    if where == "arm64":
        daemon = in_root(root, [f"{VENV}/bin/eyed", *args], cpu, stderr=subprocess.PIPE)
    else:
        daemon = subprocess.Popen([sys.executable, "-m", "eyed", *args], cwd=ROOT, text=True, stderr=subprocess.PIPE)
    log: list[str] = []
    # Drained as it comes, so a chatty log never blocks the daemon on a full pipe.
    reader = threading.Thread(target=lambda: log.extend(daemon.stderr or []), daemon=True)
    reader.start()
    try:
        events = labels_of(daemon, endpoint, frames)
        if daemon.wait(600) != 0:
            raise RuntimeError(f"{where}: the daemon exited {daemon.returncode}")
    except BaseException:
        daemon.kill()
        reader.join(5)
        print("".join(log[-30:]), file=sys.stderr)
        raise
    reader.join(5)
    other = [line.rstrip() for line in log if line.strip() and not INFO.match(line)]
    return events, [line for line in other if not any(n in line for n in EMULATION_NOISE)]


# Run in both places by the same Python: where do the two differ, in resizing or in the model's kernels? It sees
# pixels only in memory, and prints digests of the resized frames, never the frames.
PROBE = """
import hashlib, json, sys
import numpy as np
from eyed.config import ModelConfig, SourceConfig
from eyed.model.onnx_backend import OnnxClassifier
from eyed.sources import open_recorded
data, skip, frames, synthetic, *models = sys.argv[1:]
prepare = OnnxClassifier(ModelConfig(onnx=models[0], threads=1)).prepare
with open_recorded(SourceConfig(dataset=data, split="train", skip=int(skip), limit=int(frames))) as src:
    digests = [hashlib.sha256(prepare(f.image).tobytes()).hexdigest() for f in src.frames()]
# Pictures of 7x7 blocks of 32x32 pixels, made at the model's size by numpy alone, so the same bytes on every
# machine: no resizing, the kernels alone.
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (int(synthetic), 7, 7, 3), dtype=np.uint8).repeat(32, axis=1).repeat(32, axis=2)
logits = {m: OnnxClassifier(ModelConfig(onnx=m, threads=1)).logits(x).tolist() for m in models}
print(json.dumps({"digests": digests, "logits": logits}))
"""


def probe(where: str, root: Path, data: str, skip: int, frames: int, models: list[str], cpu: str = "") -> Any:
    args = [data, str(skip), str(frames), str(SYNTHETIC_FRAMES), *models]
    if where == "arm64":
        proc = in_root(root, [f"{VENV}/bin/python", "-c", PROBE, *args], cpu, stdout=subprocess.PIPE)
    else:
        proc = subprocess.Popen([sys.executable, "-c", PROBE, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"{where}: the probe exited {proc.returncode}")
    return json.loads(out.splitlines()[-1])


def compare_probes(arm: dict[str, Any], x86: dict[str, Any], names: list[str]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(arm["digests"], x86["digests"], strict=True))
    kernels = {}
    for name, (a, b) in zip(names, zip(arm["logits"].values(), x86["logits"].values(), strict=True), strict=True):
        la, lb = np.asarray(a), np.asarray(b)
        kernels[name] = {
            "top1_agreement": float((la.argmax(1) == lb.argmax(1)).mean()),
            "max_logit_diff": float(np.abs(la - lb).max()),
        }
    return {"resized_frames_identical": same / len(x86["digests"]), "same_input": kernels}


def outputs(event: dict[str, Any]) -> tuple[Any, ...]:
    """What a label event says of its frame (not when, nor how fast)."""
    return event["class_id"], event["score"], event["topk"], event["coarse"]


def compare(arm: dict[int, dict[str, Any]], x86: dict[int, dict[str, Any]]) -> dict[str, Any]:
    frames = sorted(set(arm) & set(x86))
    top1 = sum(arm[i]["class_id"] == x86[i]["class_id"] for i in frames)
    coarse = sum((arm[i]["coarse"] or {}).get("label") == (x86[i]["coarse"] or {}).get("label") for i in frames)
    labelled = [i for i in frames if x86[i]["truth"] is not None and x86[i]["coarse"] and arm[i]["coarse"]]
    right = {
        name: sum(run[i]["coarse"]["label"] == run[i]["truth"] for i in labelled) / max(len(labelled), 1)
        for name, run in (("arm64", arm), ("x86_64", x86))
    }
    return {
        "frames": len(frames),
        "top1_agreement": top1 / len(frames),
        "coarse_agreement": coarse / len(frames),
        # Of the same class: where the classes differ, so do the scores' meanings.
        "max_top1_score_diff": max(
            (abs(arm[i]["score"] - x86[i]["score"]) for i in frames if arm[i]["class_id"] == x86[i]["class_id"]),
            default=0.0,
        ),
        "coarse_accuracy": right,
    }


def export_config(shared: Path) -> list[str]:
    """`eyed export`'s configuration: configs/replay.toml on the model and data in ``shared`` ($EYED_SHARED),
    not on the paths it names relative to the folder eyed starts from."""
    # Imported here, not at the top: the tests import this script as benchmarks.arm64_qemu, where its
    # siblings are not top-level modules as they are for the script.
    from assets import REPLAY_CONFIG, replay_overrides, set_args

    return ["--config", str(REPLAY_CONFIG), *set_args(replay_overrides(shared))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    # The held-out records of the README's accuracy figures, past those the INT8 file is calibrated on.
    parser.add_argument("--skip", type=int, default=45000, help="first record replayed")
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/eyed-arm64"))
    # A Raspberry Pi 4's cores, without the dot-product instructions, and a Pi 5's, with them.
    parser.add_argument("--cpus", default="cortex-a72,cortex-a76", help="QEMU CPU models to run, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: chroot and bind mounts")
    from assets import shared_folder

    shared = shared_folder()
    data = shared / "data" / "cifar10"
    if not data.is_dir():
        raise SystemExit(f"no CIFAR-10 shards in {data}: set EYED_SHARED")
    ensure_root(args.root)
    with tempfile.TemporaryDirectory(prefix="eyed-arm64-") as tmp:
        wheels, models = Path(tmp, "wheels"), Path(tmp, "models")
        # From a copy: setuptools would reuse the checkout's build/ folder, stale modules and all.
        source = Path(tmp, "source")
        skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.onnx")
        shutil.copytree(ROOT, source, ignore=skip)
        sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(source)])
        shutil.copy(ROOT / "configs/replay.toml", wheels / "replay.toml")
        wheel = next(wheels.glob("eyed-*.whl"))
        models.mkdir()
        eyed = [sys.executable, "-m", "eyed"]
        config = export_config(shared)
        fp32, int8 = models / "fp32.onnx", models / "int8-aarch64.onnx"
        sh([*eyed, "export", *config, "--output", str(fp32)], cwd=ROOT, stdout=subprocess.DEVNULL)
        # Calibrated on records 0-299 and checked on 300-799, as `eyed export --int8` does by default.
        int8_cmd = [*eyed, "export", *config, "--int8", "--target-cpu", "aarch64", "--output", str(int8)]
        sh(int8_cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        report: dict[str, Any] = {"runs": {}, "logged": [], "probes": {}}
        # Everything each emulated CPU computed (logits on the synthetic frames, labels and scores of every
        # frame), to tell whether the CPU models differ at all.
        computed: dict[str, list[Any]] = {cpu: [] for cpu in args.cpus.split(",")}
        with mounted(args.root, shared, wheels, models):
            report["installed"] = install(args.root, wheel)
            names, files = ["fp32", "int8"], [fp32, int8]
            x86 = probe("x86_64", args.root, str(data), args.skip, args.frames, [str(f) for f in files])
            for cpu in args.cpus.split(","):
                in_arm = [f"{MODELS}/{f.name}" for f in files]
                arm = probe("arm64", args.root, f"{SHARED}/data/cifar10", args.skip, args.frames, in_arm, cpu)
                report["probes"][cpu] = compare_probes(arm, x86, names)
                computed[cpu].append(list(arm["logits"].values()))
            for name, path in zip(names, files, strict=True):
                x86, logged = run_daemon("x86_64", args.root, str(path), str(data), args.skip, args.frames)
                report["logged"] += [f"x86_64 {name}: {line}" for line in logged]
                for cpu in args.cpus.split(","):
                    model, replay = f"{MODELS}/{path.name}", f"{SHARED}/data/cifar10"
                    arm, logged = run_daemon("arm64", args.root, model, replay, args.skip, args.frames, cpu)
                    report["logged"] += [f"arm64 {cpu} {name}: {line}" for line in logged]
                    report["runs"][f"{name} {cpu}"] = compare(arm, x86)
                    computed[cpu].append({i: outputs(e) for i, e in arm.items()})
        first, *others = computed.values()
        report["cpus_identical"] = all(other == first for other in others)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    inst = report["installed"]
    print(
        f"arm64 root: {inst['machine']}, onnxruntime {inst['onnxruntime']}, opencv {inst['opencv']}, "
        f"numpy {inst['numpy']}, torch installed: {inst['torch']}"
    )
    for name, r in report["runs"].items():
        print(
            f"{name}: {r['frames']} frames, arm64 vs x86_64: top-1 agree {r['top1_agreement']:.1%}, coarse agree "
            f"{r['coarse_agreement']:.1%}, top-1 score diff <= {r['max_top1_score_diff']:.4f}; coarse accuracy "
            f"arm64 {r['coarse_accuracy']['arm64']:.1%}, x86_64 {r['coarse_accuracy']['x86_64']:.1%}"
        )
    for cpu, p in report["probes"].items():
        kernels = "; ".join(
            f"{name}: top-1 agree {k['top1_agreement']:.0%}, logits differ by <= {k['max_logit_diff']:.5f}"
            for name, k in p["same_input"].items()
        )
        print(
            f"{cpu}: resized frames identical to x86_64's: {p['resized_frames_identical']:.1%}; on the same "
            f"{SYNTHETIC_FRAMES} synthetic frames (no resizing), {kernels}"
        )
    if len(computed) > 1:
        print(f"the emulated CPUs ({args.cpus}) computed the same to the bit: {report['cpus_identical']}")
    print(f"lines on the daemons' stderr besides eyed's INFO and the emulation's cpuinfo: {len(report['logged'])}")
    for line in report["logged"]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
