"""The longest a command leaves its user without a line of output: run it, timestamp every line, report the gap.

    python benchmarks/longest_silence.py --log demo.log -- make demo      # run, timestamp, report
    python benchmarks/longest_silence.py --analyze demo.log               # report on a log it wrote before

A line ends at a newline or a carriage return (a progress bar redrawn in place is output the user sees). The log
holds each line as ``<seconds since start>\\t<line>``; the report: the command's wall time, its exit code and the
largest gaps between two lines, with the line that ended each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def gaps(log: Path, top: int = 5) -> list[tuple[float, float, str]]:
    """(gap seconds, at second, the line after the gap), largest first."""
    stamps = []
    for line in log.read_text(errors="replace").splitlines():
        if "\t" in line:
            at, text = line.split("\t", 1)
            try:
                stamps.append((float(at), text))
            except ValueError:
                continue
    out = [(b[0] - a[0], b[0], b[1]) for a, b in zip(stamps, stamps[1:])]
    return sorted(out, reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="where the timestamped output goes")
    parser.add_argument("--analyze", type=Path, help="report on an existing log instead of running a command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args()
    if args.analyze:
        log, code, wall = args.analyze, None, None
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command or not args.log:
            parser.error("give --log LOG -- COMMAND, or --analyze LOG")
        log, t0 = args.log, time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            pending = b""
            out.write(f"0.0\t$ {' '.join(command)}\n")
            while chunk := proc.stdout.read1(65536):
                now = time.monotonic() - t0
                pending += chunk
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    out.write(f"{now:.1f}\t{text}\n")
                    sys.stdout.write(text + "\n")
                out.flush()
            code = proc.wait()
            wall = time.monotonic() - t0
            out.write(f"{wall:.1f}\t(exit {code})\n")
    print(f"\n{log}: " + (f"exit {code}, wall {wall:.0f} s; " if wall is not None else "") + "largest silences:")
    for gap, at, text in gaps(log):
        print(f"  {gap:6.1f} s, ending at {at:7.1f} s with: {text[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
