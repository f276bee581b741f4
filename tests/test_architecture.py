"""The shape of the package: the library is the method only, modules stay small, no import
cycle, no module reads another's private attributes, and the console script stops at once
when the harness's extras are missing."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "srlora"
EXPERIMENT_ONLY = ("matplotlib", "sklearn", "scipy", "onnx", "gguf", "rdata", "lightning", "pytorch_lightning")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """srlora modules that ``name`` imports, TYPE_CHECKING-only imports included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def test_import_srlora_loads_no_experiment_package():
    code = "import sys, srlora; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "srlora" in loaded
    assert loaded.isdisjoint(EXPERIMENT_ONLY), loaded & set(EXPERIMENT_ONLY)


def test_no_import_cycle():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package importing its own submodules (``__init__`` re-exports) is not a cycle.
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_reads_another_modules_private_attributes():
    offences = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or node.level):
                offences += [f"{name}: imports {a.name}" for a in node.names if _private(a.name)]
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value
                while isinstance(owner, ast.Attribute):
                    owner = owner.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls", "torch"):
                    continue  # its own state, or PyTorch's fused kernels (torch._foreach_*)
                offences.append(f"{name}:{node.lineno}: .{node.attr}")
    assert offences == []


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def test_no_source_file_over_450_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 450}
    assert long == {}


@pytest.mark.parametrize("missing", ["scipy", "matplotlib"])
def test_console_script_stops_at_once_without_its_extras(missing):
    # A module set to None in sys.modules cannot be imported: as if it were not installed.
    code = (
        f"import sys; sys.modules[{missing!r}] = None; from srlora.experiments import main; sys.exit(main(['compare']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "pip install 'srlora[experiments]'" in lines[0] and missing in lines[0]


# What tells the kinds of layer apart (srlora.kinds): only targets.py, which picks a layer's
# kind, and the kind modules themselves may read it; the rest of the method asks the target.
KIND_FLAGS = re.compile(
    r"\.(sharded|quantized|zero3)\b|\bis_sharded\(|\bis_partitioned\(|\bkind\s*[!=]=|"
    r"isinstance\([^)]*\b(DenseTarget|Fsdp2Target|Zero3Target|Zero12Target|BnbTarget)\b|"
    r"from \.+(kinds\.)?(fsdp|zero3|zero12|quantized|dense|sharding) import|import deepspeed"
)
KIND_HOMES = ("srlora.targets", "srlora.kinds")


def test_kind_flags_only_in_layers_and_the_kind_modules():
    offences = []
    for name, path in _modules().items():
        if name.startswith(KIND_HOMES):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if KIND_FLAGS.search(code) and not code.lstrip().startswith(('"', "'", 'f"')):
                offences.append(f"{name}:{lineno}: {line.strip()}")
    assert offences == []


def test_every_kind_implements_the_whole_interface():
    from srlora.kinds import BnbTarget, DenseTarget, Fsdp2Target, LoraTarget, Zero3Target, Zero12Target

    abstract = [n for n, v in vars(LoraTarget).items() if callable(v) and _raises_not_implemented(v)]
    assert abstract  # the interface names what a kind must provide
    for kind in (DenseTarget, Fsdp2Target, Zero3Target, Zero12Target, BnbTarget):
        missing = [n for n in abstract if getattr(kind, n) is getattr(LoraTarget, n)]
        assert missing == [], (kind.__name__, missing)
        assert kind.kind != LoraTarget.kind


def _raises_not_implemented(fn: object) -> bool:
    import inspect

    try:
        source = inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return "raise NotImplementedError" in source and source.count("\n") < 12


def test_the_config_documents_every_field_in_its_docstring_and_in_the_api_table():
    import dataclasses

    from srlora import SRLoRAConfig
    from srlora.experiments.options import fields_table

    doc = SRLoRAConfig.__doc__ or ""
    for f in dataclasses.fields(SRLoRAConfig):
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        assert f"{f.name} ({default}):" in doc, f"SRLoRAConfig's docstring does not list {f.name} ({default})"
    api = (SRC.parents[1] / "docs/API.md").read_text()
    table = api.split("<!-- fields_table: begin -->\n", 1)[1].split("\n<!-- fields_table: end -->", 1)[0]
    assert table == fields_table(), (
        "docs/API.md's field table is stale: write srlora.experiments.options.fields_table() into it"
    )
