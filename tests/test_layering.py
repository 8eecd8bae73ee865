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
    assert list(found)[:6] == ["generate", "serve", "bench", "eval", "plan", "catalogue"]
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


# ---------------------------------------------------------------------------- one door for private APIs
# Other libraries' private names are reached only through asyncgen/_compat.py (issue 23, item 4).

THIRD_PARTY = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "multiprocessing")
# underscore names of those libraries that asyncgen once reached, or might: flagged on any object
KNOWN_PRIVATE_ATTRIBUTES = frozenset({
    # torch.nn.Module internals
    "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_forward_hooks", "_forward_pre_hooks",
    "_backward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_load_state_dict_pre_hooks", "_call_impl", "_apply", "_named_members", "_orig_mod",
    # torch internals
    "_schema", "_parse_to", "_get_default_store", "_abort_process_group", "_pytree", "_python_dispatch",
    "_subclasses", "_dynamo", "_inductor", "_C", "_nn", "_resource_tracker",
    # diffusers
    "_execution_device", "_get_add_time_ids", "_from_config", "_keep_in_fp32_modules", "_keep_in_fp32_modules_strict",
    "_is_stateful", "_diffusers_hook", "_from_deprecated_attn_block", "_compute_video_freqs", "_internal_dict",
    "_fn_refs", "_hook_order", "_module_ref", "_no_split_modules", "_optional_components", "_callback_tensor_inputs",
    "_exclude_from_cpu_offload", "_hf_hook", "_encode_prompt", "_get_t5_prompt_embeds", "_get_clip_prompt_embeds",
    # transformers
    "_attn_implementation", "_supports_sdpa", "_tied_weights_keys", "_init_weights",
    # config keys written through the library's API (the keys of saved files, read as data, are a file format)
    "_name_or_path",
})
PUBLIC_DESPITE_UNDERSCORE = {("os", "_exit")}
COMPAT = ROOT / "asyncgen" / "_compat.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root_name(node: ast.AST) -> tuple[str | None, list[str]]:
    """The name an attribute chain starts from and the attributes after it (``a.b._c`` -> ``a``, [b, _c])."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), attrs[::-1]


def private_api_uses(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every use of another library's private name in ``source`` (see the test below)."""
    tree = ast.parse(source)
    bound: set[str] = set()  # names bound to a third-party library or to something imported from one
    found: list[str] = []

    def third_party(module: str | None) -> bool:
        return bool(module) and module.split(".")[0] in THIRD_PARTY

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):  # the bindings first: a function may use a name imported further down
        if isinstance(node, ast.Import):
            for alias in node.names:
                if third_party(alias.name):
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and third_party(node.module):
            bound |= {alias.asname or alias.name for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if third_party(alias.name) and any(_is_private(p) for p in alias.name.split(".")):
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and not node.level and third_party(node.module):
            if any(_is_private(p) for p in node.module.split(".")):
                report(node, f"from {node.module} import ...")
            for alias in node.names:
                if _is_private(alias.name):
                    report(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            root, attrs = _root_name(node)
            chain = ".".join([root or "...", *attrs])
            if node.attr in KNOWN_PRIVATE_ATTRIBUTES:
                report(node, f"{chain} (a known private attribute of a library)")
            elif root in bound and (root, node.attr) not in PUBLIC_DESPITE_UNDERSCORE:
                report(node, f"{chain} (a private name of a library)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                attr = node.args[1].value
                root, _ = _root_name(node.args[0])
                if attr in KNOWN_PRIVATE_ATTRIBUTES or (_is_private(attr) and root in bound):
                    report(node, f'{name}(..., "{attr}")')
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in KNOWN_PRIVATE_ATTRIBUTES:
                    report(node, f"{keyword.arg}= (a known private keyword of a library)")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value in KNOWN_PRIVATE_ATTRIBUTES:
            report(node, f'[...]["{node.slice.value}"]')
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__setattr__" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "object" and node.args \
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "self"):
            report(node, "object.__setattr__ on another object (past its class's __setattr__)")
    return found


def test_no_private_api_of_another_library_outside_compat():
    wrong = []
    for folder in ("asyncgen", "pipelines", "cli", "evaluation"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != COMPAT:
                wrong += private_api_uses(path.read_text(), str(path.relative_to(ROOT)))
    assert not wrong, ("private or version-specific APIs of other libraries used outside asyncgen/_compat.py "
                       "(add a named function there and call it):\n" + "\n".join(wrong))


def test_the_private_api_check_catches_each_kind():
    cases = {
        "from torch._subclasses.fake_tensor import FakeTensorMode": "from torch._subclasses.fake_tensor",
        "import torch._C": "import torch._C",
        "from diffusers.hooks._helpers import x": "from diffusers.hooks._helpers",
        "from torch.utils import _pytree": "import _pytree",
        "import torch\ntorch._C._nn._parse_to(1)": "torch._C",
        "import torch.distributed as dist\ndist.distributed_c10d._get_default_store()": "dist.distributed_c10d._get",
        "from torch import nn\nnn.Module._parameters": "nn.Module._parameters",
        "def f(m):\n    return m._buffers": "m._buffers",
        "def f(p):\n    return p._execution_device": "_execution_device",
        'def f(m):\n    return getattr(m, "_keep_in_fp32_modules", None)': '"_keep_in_fp32_modules"',
        'import torch\ndef f():\n    return hasattr(torch, "_dynamo_x")': '"_dynamo_x"',
        'def f(m):\n    return m.__dict__["_parameters"]': '["_parameters"]',
        "def f(pipe, m):\n    object.__setattr__(pipe, 'unet', m)": "object.__setattr__",
        "from multiprocessing import resource_tracker\nresource_tracker._resource_tracker": "_resource_tracker",
        "def f(model):\n    model.register_to_config(_name_or_path='x')": "_name_or_path=",
    }
    for source, expected in cases.items():
        found = private_api_uses(source)
        assert len(found) >= 1 and any(expected in f for f in found), (source, found)
    allowed = ("import os\nos._exit(1)\n"
               "class A:\n    def __init__(self):\n        object.__setattr__(self, '_x', 1)\n        self._y = 2\n"
               "import torch\nx = torch.float16\n"
               "from asyncgen.evaluation import pixel_checker\ny = pixel_checker._UNIT_AREA\n"
               "from asyncgen._compat import tree_leaves\n")
    assert private_api_uses(allowed) == []
