"""The experiment harness on top of the method: the ``srlora`` command, tasks and their
offline assets, runs, metrics, plots and the results study (``docs/RESULTS.md``).

It needs the ``experiments`` extras (``pip install 'srlora[experiments]'``);
:func:`main`, the console script, checks for them before doing any work.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> distribution name, for the packages ``srlora[experiments]`` installs.
EXTRAS = {
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "gguf": "gguf",
    "onnx": "onnx",
    "rdata": "rdata",
}
INSTALL_HINT = "pip install 'srlora[experiments]'"


def missing_extras() -> list[str]:
    """The distributions of :data:`EXTRAS` that cannot be imported (found without importing them)."""
    missing = []
    for module, dist in EXTRAS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
            found = False
        if not found:
            missing.append(dist)
    return missing


def main(argv: list[str] | None = None) -> int:
    """The ``srlora`` console script: stops at once, with the fix, when an extra is missing."""
    missing = missing_extras()
    if missing:
        print(
            f"srlora: error: the experiment harness needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; fix: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from .cli import main as cli_main

    return cli_main(argv)
