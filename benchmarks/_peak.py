"""Run a Python module or script in this process, then write its peak RSS to a file.

    python _peak.py OUT_FILE -m package.module [args...]
    python _peak.py OUT_FILE script.py [args...]

The peak is this process's VmHWM, which counts from its own exec. wait4's ru_maxrss does
not: Linux folds the parent's high-water mark into the child's at exec, so a child of a
parent that once held 7.5 GB reports at least 7.5 GB whatever it used.
"""

import atexit
import os
import runpy
import sys


def _write_peak(path: str) -> None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(path, "w") as out:
                    out.write(str(int(line.split()[1]) * 1024))


def main() -> None:
    path, target = sys.argv[1], sys.argv[2:]
    atexit.register(_write_peak, path)
    # sys.path[0] as if the target had been run directly (this file's folder is there now)
    if target[0] == "-m":
        sys.argv, sys.path[0] = [target[1], *target[2:]], os.getcwd()
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = target, os.path.dirname(os.path.abspath(target[0]))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
