#!/usr/bin/env python3
"""Deploy wall time against the floor, for 1, 10 and 50 hosts (real sshd on loopback).

For each fleet size N this starts N sshd hosts (tests/sshd_harness.py), then measures:

  switchover cold    first deploy of a 50 MB / 2000-file app
  switchover redeploy  the same app with 1% of files changed (the number that matters)
  floor redeploy     bare parallel `rsync -a --link-dest` of the same change over a fresh
                     multiplexed ssh connection per host, plus one `mv` per host
  floor+checksum     the same with `--checksum`, which switchover uses (see README)

and counts SSH connections per host per deploy from the sshd logs. The redeploys and the
floors are timed in rounds (one 1% change, then each of the three, in rotating order),
so that both sides of the ratio see the same minutes of this shared machine; before each
run the hosts' background work (pruned releases, the next spare clone) is let finish, as
it would be on real hosts long before the next deploy. Run as root:

    python3 bench/fleet_bench.py [--hosts 1,10,50] [--files 2000] [--mb 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from project import settle  # noqa: E402
from sshd_harness import SshFleet  # noqa: E402


def make_app(path: Path, files: int, total_mb: int, seed: int = 1) -> list[Path]:
    rng = random.Random(seed)
    size = total_mb * 1_000_000 // files
    out = []
    for i in range(files):
        p = path / f"d{i % 40:02d}" / f"f{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        out.append(p)
    return out


def change(files: list[Path], fraction: float, round_: int) -> None:
    rng = random.Random(round_)
    for p in rng.sample(files, max(1, int(len(files) * fraction))):
        with p.open("r+b") as f:
            f.write(rng.randbytes(64))


# The interpreter that runs the timed `switchover` (main() sets it: --python).
PYTHON = sys.executable


def switchover(config: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([PYTHON, "-m", "switchover", "-c", str(config), *args],
                       capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"switchover {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return took


def settle_fleet(fleet: SshFleet, deadline: float = 60) -> None:
    """Wait until no host does switchover's background work (the delete of pruned releases,
    the spare clone for the next deploy). On real hosts it runs on each host's own CPU and
    disk, long before the next deploy; here every host shares this machine's 2 cores and
    one disk with the client: a timed run, ours or the floor's, that overlapped it would be
    slowed by it. Not timed; at most `deadline` seconds."""
    settle((h.root / "sw" for h in fleet.hosts), deadline)


def floor_once(fleet: SshFleet, app: Path, base: str, prev: str, new: str,
               checksum: bool) -> float:
    """Per host in parallel: open a master, rsync --link-dest into new, mv a link, close."""

    def one(host) -> None:
        ctl = f"{fleet.control_dir}/floor-%C"
        ssh = [*fleet.ssh_command, "-o", f"ControlPath={ctl}"]
        subprocess.run([*ssh, "-o", "ControlMaster=yes", "-o", "ControlPersist=30", "-fN",
                        host.alias], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rsh = " ".join(shlex.quote(a) for a in ssh)
        cmd = ["rsync", "-a", "--delete", f"--link-dest={base}/{prev}", "-e", rsh]
        if checksum:
            cmd.insert(2, "--checksum")
        subprocess.run([*cmd, f"{app}/", f"{host.alias}:{base}/{new}/"], check=True)
        link = f"ln -sfn {new} {base}/.tmp-current && mv -T {base}/.tmp-current {base}/current"
        subprocess.run([*ssh, host.alias, link], check=True)
        subprocess.run([*ssh, "-O", "exit", host.alias], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(fleet.hosts)) as pool:
        list(pool.map(one, fleet.hosts))
    return time.perf_counter() - t0


def bench(n: int, files: int, mb: int, repeat: int, work: Path) -> dict[str, float]:
    app = work / f"app{n}"
    app.mkdir()
    all_files = make_app(app, files, mb)
    with SshFleet(work / f"fleet{n}", n) as fleet:
        assert fleet.shared_path, "needs per-host mount namespaces (run as root)"
        cfg = work / f"switchover{n}.toml"
        hosts = ", ".join(json.dumps(h.alias) for h in fleet.hosts)
        cfg.write_text(
            f'app = "bench"\nparallel = {n}\nkeep_releases = 3\n'
            f'[artifact]\npath = "{app}"\n'
            f'[environments.bench]\nhosts = [{hosts}]\n'
            f'deploy_to = "{fleet.remote_root}/sw"\nssh_config = "{fleet.ssh_config}"\n'
        )
        cold = switchover(cfg, "deploy", "bench")
        # The floors: the same app on each host, in two chains of trees of their own (plain
        # and --checksum), each a whole deploy behind, like switchover's releases.
        base = f"{fleet.remote_root}/floor"
        for h in fleet.hosts:
            fleet.ssh(h.alias, f"mkdir -p {base}/r0 {base}/c0", check=True)
        floor_once(fleet, app, base, "r0", "r1", checksum=False)  # cold, untimed
        floor_once(fleet, app, base, "c0", "c1", checksum=True)
        # One 1% change per round, then each of the three, in an order that rotates (none
        # always first): this shared machine's speed drifts by ~20% over minutes, and both
        # sides of the ratio must see the same ones.
        redeploys, conns, floors, floors_c = [], [], [], []

        def ours(i: int) -> None:
            before = fleet.connection_counts()
            redeploys.append(switchover(cfg, "deploy", "bench"))
            after = fleet.connection_counts()
            conns.append(max(after[h] - before[h] for h in after))

        def floor(i: int) -> None:
            floors.append(floor_once(fleet, app, base, f"r{i + 1}", f"r{i + 2}",
                                     checksum=False))

        def floor_c(i: int) -> None:
            floors_c.append(floor_once(fleet, app, base, f"c{i + 1}", f"c{i + 2}",
                                       checksum=True))

        runs = [ours, floor, floor_c]
        for i in range(repeat):
            change(all_files, 0.01, i)
            for run in runs[i % 3:] + runs[:i % 3]:
                settle_fleet(fleet)
                run(i)
    return {
        "hosts": n,
        "cold": cold,
        "redeploy": statistics.median(redeploys),
        "floor": statistics.median(floors),
        "floor_checksum": statistics.median(floors_c),
        "ssh_connections_per_host": max(conns),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hosts", default="1,10,50")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    venv = ROOT / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(venv) if venv.exists() else sys.executable,
                    help="interpreter of the timed switchover (default: the README's .venv, "
                         "where `./scripts/demo` and `./scripts/test` install it)")
    args = ap.parse_args()
    global PYTHON
    PYTHON = args.python
    print(f"timing switchover under {PYTHON}", file=sys.stderr)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sshd hosts need their own mount namespaces")
    # An installed tool has .pyc files (pip compiles them). A source checkout run with
    # PYTHONDONTWRITEBYTECODE=1 compiles switchover's modules again at every start (~40 ms
    # per command): compile once, so the bench times the tool rather than the compiler.
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swo-bench-") as tmp:
        for n in (int(x) for x in args.hosts.split(",")):
            rows.append(bench(n, args.files, args.mb, args.repeat, Path(tmp)))
            r = rows[-1]
            print(f"{n} hosts done: redeploy {r['redeploy']:.2f}s floor {r['floor']:.2f}s",
                  file=sys.stderr)
    print(f"app: {args.files} files, {args.mb} MB; 1% changed per redeploy; "
          f"median of {args.repeat}; wall seconds")
    print("| hosts | switchover cold | switchover redeploy | floor redeploy | "
          "floor + --checksum | redeploy / floor | ssh connections per host |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['hosts']} | {r['cold']:.2f} | {r['redeploy']:.2f} | {r['floor']:.2f} | "
              f"{r['floor_checksum']:.2f} | {r['redeploy'] / r['floor']:.2f}x | "
              f"{r['ssh_connections_per_host']} |")


if __name__ == "__main__":
    main()
