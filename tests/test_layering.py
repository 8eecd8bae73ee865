"""The one-way house: cli -> pipelines -> asyncgen (the engine); evaluation and catalogue are leaves."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"asyncgen": "asyncgen", "pipelines": "asyncgen.pipelines", "cli": "asyncgen.cli",
            "evaluation": "asyncgen.evaluation", "catalogue": "asyncgen.catalogue"}
# what each layer may import from the others (anywhere in a module, lazily or not)
ALLOWED = {
    "asyncgen": {"asyncgen"},
    "asyncgen.pipelines": {"asyncgen", "asyncgen.pipelines"},
    "asyncgen.cli": {"asyncgen", "asyncgen.pipelines", "asyncgen.cli"},
    "asyncgen.evaluation": {"asyncgen", "asyncgen.pipelines", "asyncgen.cli", "asyncgen.evaluation"},
    "asyncgen.catalogue": {"asyncgen", "asyncgen.cli", "asyncgen.evaluation", "asyncgen.catalogue"},
}


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            yield name.removesuffix(".__init__"), path, path.name == "__init__.py"


def _layer(module: str) -> str:
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def _imports(name: str, path: Path, is_package: bool, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # "if TYPE_CHECKING:" and try/except blocks at module level count too
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    found = set()
    base = name if is_package else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # "from . import x" imports module x
    return {m for m in found if m == "asyncgen" or m.startswith("asyncgen.")}


def test_every_import_points_down_the_layers():
    wrong = []
    for name, path, is_package in _modules():
        layer = _layer(name)
        for target in _imports(name, path, is_package, module_level_only=False):
            if target == "asyncgen" and name.startswith("asyncgen.catalogue"):
                continue
            if _layer(target) not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the one-way rule:\n" + "\n".join(wrong)


def _string_imports(path: Path) -> set[str]:
    """Module names written as whole string constants (``importlib.import_module("asyncgen.x")``, a registry)."""
    tree = ast.parse(path.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.fullmatch(r"asyncgen(\.[a-z_0-9]+)+(:[A-Za-z_0-9.]+)?", n.value)}


def test_modules_named_in_strings_point_down_the_layers_too():
    wrong = []
    for name, path, _ in _modules():
        layer = _layer(name)
        for target in _string_imports(path):
            module = target.partition(":")[0]
            if _layer(module) not in ALLOWED[layer]:
                wrong.append(f"{name} names {module} in a string")
    assert not wrong, "string imports against the one-way rule:\n" + "\n".join(wrong)


def test_the_cli_finds_its_subcommands_through_entry_points():
    from asyncgen.cli.main import ENTRY_POINT_GROUP, commands

    text = (ROOT / "pyproject.toml").read_text()
    assert f'[project.entry-points."{ENTRY_POINT_GROUP}"]' in text
    found = commands()
    assert list(found)[:5] == ["generate", "bench", "eval", "plan", "catalogue"]
    assert found["bench"] == "asyncgen.evaluation.bench_asyncdiff"
    # the CLI's own modules name none of the layers above it (the entry points do)
    assert not [t for _, path, _ in _modules() if "cli" in path.parts for t in _string_imports(path)
                if _layer(t.partition(":")[0]) not in ALLOWED["asyncgen.cli"]]


def test_the_string_check_sees_a_registry_of_upper_modules(tmp_path):
    sample = tmp_path / "registry.py"
    sample.write_text('COMMANDS = {"bench": ("asyncgen.evaluation.bench_asyncdiff", "time it")}\n'
                      'x = "asyncgen.pipelines are the layer above"\n')
    assert _string_imports(sample) == {"asyncgen.evaluation.bench_asyncdiff"}


def test_no_module_level_import_cycle():
    modules = {name: (path, pkg) for name, path, pkg in _modules()}
    graph = {name: {t for t in _imports(name, path, pkg, module_level_only=True) if t in modules and t != name}
             for name, (path, pkg) in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_generate_never_loads_the_evaluation_harness(tmp_path):
    script = (
        "import sys\n"
        "from asyncgen.cli.main import main\n"
        f"code = main(['generate', 'a large red circle on a blue background', '-o', {str(tmp_path / 'x.png')!r}, "
        "'--steps', '2'])\n"
        "assert code == 0, code\n"
        "print(sorted(m for m in sys.modules if m.startswith(('asyncgen.evaluation', 'asyncgen.catalogue'))))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "x.png").is_file()
