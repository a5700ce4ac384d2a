"""Every module jaxkd imports at run time is a declared dependency of the package, not of the test extra.

A green suite once hid a broken main job: the test extra's torch brought jinja2, so `pip install -e .` alone
could not run `python -m jaxkd.train`. These tests read the imports themselves (module level and inside
functions) and pyproject.toml, so what the package needs and what it declares cannot drift apart again.
"""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dist(requirement: str) -> str:
  """The normalised distribution name of a requirement string ("orbax-checkpoint>=0.11" -> "orbax-checkpoint")."""
  return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def third_party_imports(folder: str, local: set[str] = frozenset()) -> list[tuple[str, str, int]]:
  """(top-level module, file, line) of every absolute import under `folder` that is neither the standard
  library, jaxkd, nor one of `local` (modules that sit beside the importing file)."""
  found = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          modules = [node.module]
        else:
          continue
        for module in modules:
          top = module.split(".")[0]
          if top in sys.stdlib_module_names or top in ("jaxkd", "__future__") or top in local:
            continue
          found.append((top, os.path.relpath(path, ROOT), node.lineno))
  return found


def _undeclared(imports, declared: set[str]) -> list[str]:
  provided = importlib.metadata.packages_distributions()
  problems = []
  for top, path, line in imports:
    dists = {_norm(d) for d in provided.get(top, [])}
    if not dists & declared:
      by = f"installed from {sorted(dists)}" if dists else "not installed at all"
      problems.append(f"{path}:{line} imports {top!r} ({by}), which no declared dependency provides")
  return problems


def test_every_module_jaxkd_imports_is_a_declared_runtime_dependency():
  imports = third_party_imports("jaxkd")
  assert {"jax", "flax", "jinja2", "transformers"} <= {top for top, _, _ in imports}  # the walk finds them
  problems = _undeclared(imports, {_dist(r) for r in _project()["dependencies"]})
  assert not problems, "add to [project] dependencies in pyproject.toml:\n" + "\n".join(problems)


def test_every_module_a_script_imports_is_a_runtime_or_scripts_dependency():
  project = _project()
  declared = {_dist(r) for r in project["dependencies"] + project["optional-dependencies"]["scripts"]}
  local = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "scripts"))}
  # Scripts run from a checkout and may share the tests' independent references (tests/distillkit_encoder.py);
  # what those import is checked with the tests.
  local.add("tests")
  problems = _undeclared(third_party_imports("scripts", local), declared)
  assert not problems, "add to the scripts extra in pyproject.toml:\n" + "\n".join(problems)


def test_every_runtime_dependency_is_imported_or_says_who_needs_it():
  """A dependency jaxkd never imports is either dead weight or needed by another package: say which."""
  provided = importlib.metadata.packages_distributions()
  imported = {_norm(d) for top, _, _ in third_party_imports("jaxkd") for d in provided.get(top, [])}
  with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
    text = f.read()
  block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
  lines = {_dist(m.group(1)): m.group(2) for m in re.finditer(r'^\s*"([^"]+)",?\s*(#.*)?$', block, re.M)}
  assert set(lines) == {_dist(r) for r in _project()["dependencies"]}  # every requirement line was read
  silent = [d for d, comment in lines.items() if d not in imported and not comment]
  assert not silent, f"jaxkd imports nothing from {silent}: remove them, or say on their line who needs them"


def test_only_transformers_notice_about_missing_torch_is_silenced():
  """Without PyTorch transformers warns at import that "Models won't be available"; jaxkd needs none of its
  models, so on a machine that installed only jaxkd that line reads as a failure. Only it is dropped."""
  import logging  # pylint: disable=import-outside-toplevel

  import jaxkd  # noqa: F401  (installs the filter)  pylint: disable=import-outside-toplevel,unused-import

  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  logger = logging.getLogger("transformers")  # transformers stops its records from propagating: listen here
  logger.addHandler(handler)
  try:
    logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                   "file/data utilities can be used.")
    logger.warning("another transformers warning")
  finally:
    logger.removeHandler(handler)
  assert seen == ["another transformers warning"]
