"""Run a benchmark or CLI command and keep what it measured as a record in docs/results/NAME.json.

    python benchmarks/record.py NAME -- COMMAND...
    python benchmarks/record.py engine_speed -- python benchmarks/engine_speed.py --repeats 5
    python benchmarks/record.py demo -- tgems demo --out results/demo --quiet
    python benchmarks/record.py demo --import results/demo/results.json --command "tgems demo --out results/demo"

COMMAND must accept `--json PATH`. If it has no `--json`, record.py adds `--json TMP` itself; if
it has one, that file is read. The record is

    {"name", "kind", "command", "date", "machine", "commit", "seconds", "data"}

where "data" is the command's JSON, "machine" the CPU model, core count, load average at the
start, torch version (and GPU names where `nvidia-smi` answers), "commit" is
`git rev-parse --short HEAD` with "+dirty" when tracked files differ from it, and "kind" tells
`results_md.py` which table to draw (by default the benchmark script's name or the `tgems`
sub-command; `--kind` overrides). Per-image arrays that only feed plots (the demo's exit layers
and difficulties) are replaced by the small summaries the tables need.

`--import JSON` stores a file a command already wrote (with `--command`, and `--date`,
`--commit`, `--seconds` when they are not now / HEAD / unknown). Then run
`python benchmarks/results_md.py` to regenerate docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
MAX_LIST = 200  # per-image lists longer than this are summarised


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for pkg in ("torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        if gpus.returncode == 0 and gpus.stdout.strip():
            out["gpus"] = [g.strip() for g in gpus.stdout.splitlines() if g.strip()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def guess_kind(cmd: list[str]) -> str:
    """`python benchmarks/engine_speed.py ...` -> engine_speed; `tgems eval ...` -> eval."""
    for i, a in enumerate(cmd):
        if a.endswith(".py"):
            return Path(a).stem
        if Path(a).name == "tgems" or (a == "-m" and i + 1 < len(cmd) and cmd[i + 1].startswith("tgems")):
            rest = [x for x in cmd[i + 1:] if not x.startswith("-") and x not in ("tgems", "tgems.cli")]
            return rest[0] if rest else "tgems"
    return "generic"


def slim(data):
    """Replace the per-image lists of demo / eval reports by what results_md.py shows of them."""
    if not isinstance(data, dict):
        return data
    extras = data.get("extras")
    if isinstance(extras, dict):
        ex = extras.get("exit_layers")
        layers = ex.get("layers") if isinstance(ex, dict) else None
        diff = extras.get("difficulty")
        if isinstance(layers, list) and len(layers) > MAX_LIST:
            ex["histogram"] = {str(k): v for k, v in sorted(Counter(layers).items())}
            ex["n"] = len(layers)
            if isinstance(diff, list) and len(diff) == len(layers):
                order = sorted(range(len(diff)), key=lambda i: diff[i])
                q = len(order) / 5
                ex["mean_by_difficulty_quintile"] = [
                    round(sum(layers[i] for i in order[int(k * q):int((k + 1) * q)])
                          / max(1, int((k + 1) * q) - int(k * q)), 3) for k in range(5)]
            del ex["layers"]
        if isinstance(diff, list) and len(diff) > MAX_LIST:
            extras["difficulty"] = f"{len(diff)} values, dropped by record.py"
    return data


def json_path(cmd: list[str]) -> tuple[list[str], Path | None]:
    """The command with a --json PATH (added when missing), and the temporary file to remove, if any."""
    for i, a in enumerate(cmd):
        if a == "--json" and i + 1 < len(cmd):
            return cmd, None
        if a.startswith("--json="):
            return cmd, None
    fd, tmp = tempfile.mkstemp(suffix=".json", prefix="record_")
    os.close(fd)
    os.unlink(tmp)
    return cmd + ["--json", tmp], Path(tmp)


def read_json_arg(cmd: list[str]) -> Path:
    for i, a in enumerate(cmd):
        if a == "--json":
            return Path(cmd[i + 1])
        if a.startswith("--json="):
            return Path(a.split("=", 1)[1])
    raise SystemExit("record.py: no --json in the command")


def write(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = []
    if "--" in argv:
        k = argv.index("--")
        argv, cmd = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="record.py NAME [options] -- COMMAND...  |  record.py NAME --import JSON --command CMD")
    ap.add_argument("name", help="record name: docs/results/NAME.json")
    ap.add_argument("--kind", help="table kind for results_md.py (default: from the command)")
    ap.add_argument("--title", help="section title in docs/results.md (default: the name)")
    ap.add_argument("--note", help="one line shown under the title")
    ap.add_argument("--import", dest="imported", metavar="JSON", help="store this existing JSON instead of running")
    ap.add_argument("--command", help="with --import: the command that wrote it")
    ap.add_argument("--date", help="with --import: when it ran (default: the file's modification time)")
    ap.add_argument("--commit", help="with --import: the commit it ran at (default: now)")
    ap.add_argument("--seconds", type=float, help="with --import: how long it ran")
    args = ap.parse_args(argv)
    if not args.name.replace("_", "").replace("-", "").isalnum():
        ap.error("NAME may hold letters, digits, '_' and '-' only")
    if bool(cmd) == bool(args.imported):
        ap.error("give either -- COMMAND... or --import JSON")

    if args.imported:
        src = Path(args.imported)
        data = json.loads(src.read_text())
        command = args.command or ""
        date = args.date or dt.datetime.fromtimestamp(src.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rev = args.commit or commit()
        seconds = args.seconds
        mach = machine()
        mach.pop("load_average", None)  # now's load says nothing about that run
        kind = args.kind or guess_kind(shlex.split(command))
    else:
        run_cmd, tmp = json_path(cmd)
        out = read_json_arg(run_cmd)
        mach, rev = machine(), commit()
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"record.py: running {shlex.join(run_cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(run_cmd).returncode
        seconds = round(time.perf_counter() - t0, 1)
        if rc != 0:
            print(f"record.py: the command failed (exit {rc}); nothing recorded", file=sys.stderr)
            return rc
        if not out.is_file():
            print(f"record.py: the command wrote no {out}; nothing recorded", file=sys.stderr)
            return 1
        data = json.loads(out.read_text())
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        command = shlex.join(cmd)
        kind = args.kind or guess_kind(cmd)

    record = {"name": args.name, "kind": kind, "command": command, "date": date, "machine": mach,
              "commit": rev, "seconds": seconds, "data": slim(data)}
    if args.title:
        record["title"] = args.title
    if args.note:
        record["note"] = args.note
    path = write(args.name, record)
    print(f"record.py: wrote {path.relative_to(ROOT)} ({kind}, {seconds} s); "
          f"now run: python benchmarks/results_md.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
