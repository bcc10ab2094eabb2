"""Write a peer venv's VERSION.json: the versions of the given distributions plus torch, transformers,
accelerate, safetensors and Python. Run by the venv's own interpreter (bench/peers/install.sh and
install_offline.sh):  python record_versions.py OUT.json [--note TEXT] DIST [DIST ...]"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("names", nargs="*")
    parser.add_argument("--note", default=None, help="how the venv was installed")
    args = parser.parse_intermixed_args()
    versions = {}
    for name in [*args.names, "torch", "transformers", "accelerate", "safetensors"]:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    if args.note:
        versions["installed_from"] = args.note
    with open(args.out, "w") as handle:
        json.dump(versions, handle, indent=2)
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
