"""A py-spy profile of the batch scenario's workers.

Usage: ``python bench/profile.py --rows 1000000 [batch.py options]``

Runs `bench/batch.py`'s scenario with `py-spy record --subprocesses --nonblocking`
attached to each worker (the pool processes included) from just before the API
call to the run's end, writes the collapsed stacks and a flame graph to
`bench/results/profile-<timestamp>.{txt,svg}`, and the largest costs (inclusive,
by project function and by task; self time by leaf function) to
`bench/results/profile-<timestamp>.json` and docs/benchmarks.md. py-spy needs
ptrace rights (root, or `kernel.yama.ptrace_scope=0`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batch import parser, run_batch
from bench.common import RESULTS_DIR, ROOT, timestamp, write_result

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
PROJECT_DIRS = ("integration/", "connectors/", "transforms/", "config/")


def _frame(raw: str) -> tuple[str, str]:
    match = FRAME.match(raw.strip())
    if not match:
        return raw.strip(), ""
    file = match.group("file")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return match.group("func"), file


def summarize(collapsed: Path) -> dict[str, Any]:
    """Inclusive shares of project functions and tasks; self shares of leaves."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        # Skip the process/thread pseudo-frames py-spy puts first.
        frames = [f for f in frames if f[1]]
        seen = set()
        for func, file in frames:
            if file.startswith(PROJECT_DIRS):
                key = f"{file}:{func}"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
        if frames:
            func, file = frames[-1]
            leaves[f"{file}:{func}"] += count
    share = (lambda n: round(n / total, 4)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "inclusive": [
            {"frame": k, "samples": n, "share": share(n)}
            for k, n in inclusive.most_common(40)
        ],
        "self": [
            {"frame": k, "samples": n, "share": share(n)}
            for k, n in leaves.most_common(40)
        ],
    }


def main() -> None:
    p = parser()
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    stamp = timestamp()
    out_dir = RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    spies: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(pids: list[int]) -> Any:
        for n, pid in enumerate(pids):
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                path = out_dir / f"profile-{stamp}-worker{n}.{suffix}"
                proc = subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(pid),
                        "--subprocesses",
                        "--nonblocking",
                        "--rate",
                        str(args.rate),
                        "--format",
                        fmt,
                        "--output",
                        str(path),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                spies.append((proc, path, path))

        def stop() -> dict[str, Any]:
            for proc, _, _ in spies:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            for proc, _, _ in spies:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            return {"files": [str(p.relative_to(ROOT)) for _, p, _ in spies]}

        return stop

    result = run_batch(args, on_workers=start)
    collapsed = out_dir / f"profile-{stamp}.txt"
    with collapsed.open("w") as out:
        for _, path, _ in spies:
            if path.suffix == ".txt" and path.exists():
                out.write(path.read_text(errors="replace"))
    summary = summarize(collapsed)
    write_result(
        "profile",
        {
            "rows": args.rows,
            "batch": {
                k: result[k]
                for k in (
                    "mode",
                    "workers",
                    "concurrency",
                    "chunk_rows",
                    "seconds",
                    "records_per_s",
                    "tasks",
                )
            },
            "profile_file": str(collapsed.relative_to(ROOT)),
            "flamegraphs": [
                str(p.relative_to(ROOT)) for _, p, _ in spies if p.suffix == ".svg"
            ],
            "sampler": f"py-spy record --subprocesses --nonblocking --rate {args.rate}",
            **summary,
            "note": args.note,
            "machine": result["machine"],
            "loadavg_after": os.getloadavg(),
        },
    )
    for row in summary["inclusive"][:15]:
        print(f"{row['share'] * 100:5.1f} %  {row['frame']}")
    print("self:")
    for row in summary["self"][:15]:
        print(f"{row['share'] * 100:5.1f} %  {row['frame']}")


if __name__ == "__main__":
    main()
