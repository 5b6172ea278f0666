"""``python blocked_run.py MODULES ARGS...``: ``python -m freezeft.run ARGS`` as if the
comma-separated MODULES were not installed (an extra a user did not install)."""

import importlib.abc
import runpy
import sys

BLOCKED = sys.argv[1].split(",")


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
sys.argv = ["freezeft.run", *sys.argv[2:]]
runpy.run_module("freezeft.run", run_name="__main__", alter_sys=True)
