"""Import structure: dependencies between lorafit's modules run one way, and the config tree is light.

The layers, bottom up: models (architectures, target names) <- methods (one file each) <- config
(the typed tree, which collects every method's settings class) <- the stages (train, inference,
export, serve, ...). The tests read the import statements themselves, so an import hidden inside a
function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import lorafit
from lorafit.methods import registry

SRC = Path(lorafit.__file__).resolve().parent.parent


def test_config_does_not_import_peft():
    # The package's __init__ is the public facade and imports train and inference (hence peft);
    # an empty stand-in for it shows what lorafit.config itself pulls in.
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('lorafit'); package.__path__ = [{str(SRC / 'lorafit')!r}]\n"
        "sys.modules['lorafit'] = package\n"
        "import lorafit.config\n"
        "print(sorted(name for name in sys.modules if name == 'peft' or name.startswith('peft.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]", "importing lorafit.config loads peft; import it inside the method hooks"


def import_graph(src: Path) -> dict[str, set[str]]:
    """lorafit module -> the lorafit modules importing it runs, from the source of the package in `src`.

    Imports inside functions count; those under `if TYPE_CHECKING:` do not (they never run). Importing
    `lorafit.methods.X` from outside that package runs `lorafit.methods/__init__`, whose
    `registry.discover()` imports every method module.
    """
    files = {}
    for path in (src / "lorafit").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ancestors(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(2, len(parts))]  # not the root package: see the test

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        unused = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                  for n in ast.walk(node)}
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in unused:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names}
        imported = set()
        for target in targets & set(files):
            imported |= {target} | {a for a in ancestors(target) if a not in ancestors(module) + [module]}
        graph[module] = imported - {module}
    graph["lorafit.methods"] |= {m for m in files if m.startswith("lorafit.methods.")
                                 and m.rpartition(".")[2] not in registry.NOT_METHODS}  # registry.discover()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_lorafit_modules():
    # The root package is left out: its __init__ is the facade that imports the stages, and a stage
    # reading `lorafit.__version__` from it is not a dependency between layers.
    graph = {m: targets - {"lorafit"} for m, targets in import_graph(SRC).items() if m != "lorafit"}
    assert cycles(graph) == [], "import cycle among lorafit modules; see the layers in this file's docstring"


def test_the_layers_run_one_way():
    graph = import_graph(SRC)
    assert "lorafit.config" not in graph["lorafit.models"]
    assert "lorafit.methods.ia3" in graph["lorafit.methods"]  # discovery is part of the graph
    assert {"lorafit.methods", "lorafit.methods.registry"} <= graph["lorafit.config"]


#: What a process sees of lorafit's API: torch loaded or not, then what `train` and `load_config` are.
API_PROBE = ("import json, sys, lorafit\n"
             "loaded = 'torch' in sys.modules\n"
             "import lorafit.train\n"  # the submodule of the same name as the function, imported after the package
             "print(json.dumps([loaded, callable(lorafit.train), type(lorafit.train).__name__, lorafit.load_config.__module__]))\n")
#: A plain environment for it: the system allocator (no relaunch), the hub offline.
PROBE_ENV = {"LORAFIT_MALLOC": "system", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}


def test_run_as_a_program_lorafit_answers_before_loading_torch(tmp_path):
    """`lorafit --help` or a mistyped flag answers at once: a program named lorafit (the console script)
    imports neither torch nor transformers until its verb needs them, and the API's names still resolve."""
    script = tmp_path / "bin" / "lorafit"
    script.parent.mkdir()
    script.write_text(API_PROBE)
    program = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=PROBE_ENV)
    assert program.returncode == 0, program.stderr
    loaded, _, _, config_module = json.loads(program.stdout)
    assert not loaded and config_module == "lorafit.config"
    # ... and `lorafit --help` itself, as `python -m lorafit`, lists the verbs without torch.
    code = "import runpy, sys; sys.argv = ['lorafit', '--help']\ntry:\n    runpy.run_module('lorafit', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    (tmp_path / "bin" / "lorafit").write_text(code)
    helped = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=PROBE_ENV)
    assert "train" in helped.stdout and helped.stdout.strip().endswith("False"), helped.stdout + helped.stderr


def test_imported_lorafit_binds_the_api_functions_over_the_submodules():
    """Imported by a program of another name, the whole API is there at once, and lorafit.train stays the
    function after the submodule lorafit.train is imported."""
    program = subprocess.run([sys.executable, "-c", API_PROBE], capture_output=True, text=True, timeout=300, env=PROBE_ENV)
    assert program.returncode == 0, program.stderr
    assert json.loads(program.stdout) == [True, True, "function", "lorafit.config"]
