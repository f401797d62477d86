"""The package's shape: no jmid module imports another that imports it back, directly or
through others, counting imports inside functions too (a lazy import hides a cycle, it does
not remove it)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "jmid")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jmid"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("jmid"))
  return {m for m in found if m in modules}


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  cycles = []

  def visit(m: str, path: list[str], done: set[str]) -> None:
    for dep in sorted(graph[m]):
      if dep in path:
        cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
      elif dep not in done:
        done.add(dep)
        visit(dep, path + [dep], done)

  for m in sorted(graph):
    visit(m, [m], set())
  assert not cycles, cycles[:5]
  assert "jmid.checkpoint.commands" in graph  # the walk sees the packages' modules
