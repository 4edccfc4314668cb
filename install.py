"""Install requirements.txt into the Python that runs this script (ComfyUI-Manager and A1111 run it).

Idempotent: requirements that are already satisfied are left alone, and torch is never installed or replaced
(it is not in requirements.txt, and pip is told to keep whatever torch is there).
"""
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent


def missing_requirements(path: Path) -> list[str]:
    missing = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def main() -> int:
    missing = missing_requirements(HERE / "requirements.txt")
    if not missing:
        print("ComfyUI-Personalize: all requirements already satisfied; nothing installed.")
        return 0
    print(f"ComfyUI-Personalize: installing {', '.join(missing)}")
    constraint = []
    try:
        constraint = [f"torch=={metadata.version('torch')}"]  # keep the user's torch exactly as it is
    except metadata.PackageNotFoundError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", *missing]
    if constraint:
        cons = HERE / ".torch-constraint.txt"
        cons.write_text("\n".join(constraint) + "\n")
        cmd += ["-c", str(cons)]
    result = subprocess.run(cmd, check=False)
    print("ComfyUI-Personalize: install", "done" if result.returncode == 0 else "FAILED")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
