"""Run a Python module or script in this process, then write its peak RSS to a file.

    python _peak.py OUT_FILE -m package.module [args...]
    python _peak.py OUT_FILE script.py [args...]

The peak is this process's VmHWM, which counts from its own exec. wait4's ru_maxrss does
not: Linux folds the parent's high-water mark into the child's at exec, so a child of a
parent that once held 7.5 GB reports at least 7.5 GB whatever it used.
"""

import atexit
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
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        sys.path.insert(0, str(__import__("pathlib").Path(target[0]).resolve().parent))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
