"""The package's import graph: no cycle between modules, dependencies pointing one way
between the layers, and every module importable alone, without side effects."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("mtaclip_jax", "convert_weights")

# Each layer may import itself and the layers after it, never one before it.
LAYERS = (
    (
        "mtaclip_jax.main",
        "mtaclip_jax.predict",
        "mtaclip_jax.export",
        "mtaclip_jax.summary",
        "mtaclip_jax.cli",
        "mtaclip_jax.data.check",  # a command line beside the readers it drives
    ),
    ("mtaclip_jax.serve",),
    ("mtaclip_jax.train",),
    ("mtaclip_jax.evaluation",),
    ("mtaclip_jax.config",),
    ("convert_weights",),
    ("mtaclip_jax.objective", "mtaclip_jax.data"),
    ("mtaclip_jax.models",),
    ("mtaclip_jax.runtime", "mtaclip_jax.models.ops", "mtaclip_jax.errors"),
)


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      out[".".join(parts)] = path
  return out


def imports_of(name: str, path: pathlib.Path, known) -> set[str]:
  """Project modules that `name` imports anywhere in its file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".")[
            : len(name.split(".")) - node.level + (path.name == "__init__.py")
        ]
        base = ".".join(package + ([base] if base else []))
      targets = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    for target in targets:
      while target and target not in known:
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  # "from a.b import c" also lists the package a.b itself: keep only the deepest.
  return {t for t in found if not any(o.startswith(t + ".") for o in found)}


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  sys.setrecursionlimit(10_000)
  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def layer_of(name: str) -> int:
  best, depth = None, -1
  for i, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
        best, depth = i, len(prefix)
  return best


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
  found = cycles(graph())
  assert not found, f"modules that import each other in a circle: {found}"


def test_every_module_has_a_layer_and_imports_point_down():
  edges = graph()
  unplaced = sorted(m for m in edges if layer_of(m) is None and m not in PACKAGES)
  assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
  upward = sorted(
      f"{a} -> {b}"
      for a, targets in edges.items()
      for b in targets
      if a not in PACKAGES and b not in PACKAGES and layer_of(b) < layer_of(a)
  )
  assert not upward, f"imports against the layer order: {upward}"


def test_every_module_imports_alone_without_side_effects():
  names = [m for m in modules() if not m.endswith("__main__")]
  script = (
      "import importlib, os, sys\n"
      "before = os.environ.get('XLA_FLAGS')\n"
      f"for name in {names!r}:\n"
      "  importlib.import_module(name)\n"
      "assert os.environ.get('XLA_FLAGS') == before, 'an import changed XLA_FLAGS'\n"
      "assert 'jax' not in sys.modules or not __import__('jax')._src.xla_bridge"
      "._backends, 'an import started a jax backend'\n"
  )
  # One interpreter per module would cost ~5 s each; each module is imported first
  # in its own interpreter only where the order could hide a cycle, so one
  # interpreter imports them all in a fixed order, and a second in reverse order.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for order in (names, names[::-1]):
    code = script.replace(repr(names), repr(order))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
