"""The package layout: no import circle between effx's modules, and no import that runs
back up the layers (common < attention < layers < models < pretrained < data < compress
< training < launch < the command modules)."""

import ast
import pathlib

import effx

ROOT = pathlib.Path(effx.__file__).parent
# Each package with the packages it may import (besides itself); the command modules
# (effx/<name>.py) and effx/__init__.py may import anything.
ALLOWED = {
    "common": set(),
    "attention": {"common"},
    "layers": {"common", "attention"},
    "models": {"common", "attention", "layers"},
    "pretrained": {"common", "attention", "layers", "models"},
    "data": {"common", "pretrained"},
    "compress": {"common", "attention", "layers", "models"},
    "training": {"common", "attention", "layers", "models", "pretrained", "data", "compress"},
    "launch": {"common", "training", "cli"},
    "bench": {"common", "attention", "layers", "models", "data", "compress", "training", "cli"},
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every effx module ``path`` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("effx")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("effx"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        is_module = (ROOT.parent / (candidate.replace(".", "/") + ".py")).exists() or (
            ROOT.parent / candidate.replace(".", "/") / "__init__.py").exists()
        found.add(candidate if is_module else node.module)
  return found


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
  return {name: {m for m in _imports(path) if m in modules and m != name}
          for name, path in modules.items()}


def test_no_import_circle():
  graph = _graph()
  state: dict[str, int] = {}

  def visit(name, stack):
    state[name] = 1
    for dep in sorted(graph[name]):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError("import circle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, stack + [dep])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_no_import_runs_back_up():
  bad = []
  for name, deps in _graph().items():
    parts = name.split(".")
    if len(parts) < 3 and not (ROOT / parts[-1]).is_dir():
      continue  # effx/__init__.py and the command modules
    package = parts[1]
    for dep in deps:
      target = dep.split(".")[1] if dep != "effx" else "effx"
      if target != package and target not in ALLOWED[package]:
        bad.append(f"{name} imports {dep}")
  assert not bad, "imports that run back up the layers:\n" + "\n".join(sorted(bad))


def test_top_level_holds_commands_only():
  """effx/ itself holds the package docstring, the command helper and the commands."""
  modules = sorted(p.stem for p in ROOT.glob("*.py"))
  assert modules == ["__init__", "aot", "cli", "embed", "evaluate", "export", "quantize",
                     "sample", "structured", "sweep", "train"]
