"""Start-up time of the CLI against importing torch and timm, measured side by side.

    python benchmarks/startup.py [--rounds 10]

Alternates the commands round by round (so a busy machine slows them alike) and prints the
median wall time of each and the ratios. ``smi --help``, ``smi --version`` and shell
completion import neither torch nor timm, so they should take a small fraction of the import.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

SMI = [sys.executable, "-m", "smi_cli"]
COMMANDS = {
    "smi --help": (SMI + ["--help"], {}),
    "smi --version": (SMI + ["--version"], {}),
    "smi completion (Tab)": (SMI, {"_SMI_COMPLETE": "complete_bash", "COMP_WORDS": "smi inv", "COMP_CWORD": "1"}),
    'python -c "import torch, timm"': ([sys.executable, "-c", "import torch, timm"], {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, (argv, env) in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - started)
    baseline = statistics.median(times['python -c "import torch, timm"'])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:6.3f} s  ({median / baseline:.3f} of importing torch and timm)")


if __name__ == "__main__":
    main()
