"""The documentation covers the public API, and README stays a short PyPI page.

Read from the sources alone (no import of morsock, so optional extras and Tk need not be
installed): the public names of every public module of the package, and the names the API
reference (``docs/api/*.rst``) documents. A name imported from another module of the
package counts as documented where its defining module's name is (``morsock.Server`` is
``morsock.server.Server``).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _package_dir() -> Path:
    """The package's sources: the checkout's, else the installed ones (CI tests the
    wheel from a tree without morsock/). find_spec of a top-level name imports nothing."""
    if (ROOT / "morsock" / "__init__.py").is_file():
        return ROOT / "morsock"
    spec = importlib.util.find_spec("morsock")
    assert spec is not None and spec.origin, "morsock is neither in the tree nor installed"
    return Path(spec.origin).parent


PACKAGE = _package_dir()
API_DIR = ROOT / "docs" / "api"
README_MAX_LINES = 250

_OBJECT_DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:class|function|exception|data|attribute|decorator)"
    r"|py:(?:class|function|exception|data|attribute|decorator)):: (.+)$")
_MODULE_DIRECTIVE = re.compile(r"^\.\. (?:automodule|py:module):: ([\w.]+)\s*$")


def _module_name(path: Path) -> str:
    parts = ["morsock"] + list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name, parsed."""
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def _top_statements(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements, including those inside module-level if/try blocks."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        out.append(node)
        if isinstance(node, ast.If):
            todo[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo[:0] = node.body + node.orelse + node.finalbody + [
                s for h in node.handlers for s in h.body]
    return out


def _assigned(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _imports(module: str, tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Names *module* imports from other modules of the package: {name: (source, name)}."""
    out: dict[str, tuple[str, str]] = {}
    for node in _top_statements(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = module.split(".")
            is_package = (PACKAGE.joinpath(*base[1:]) / "__init__.py").exists()
            base = base if is_package else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "morsock":
            continue
        for alias in node.names:
            out[alias.asname or alias.name] = (source, alias.name)
    return out


def _all(tree: ast.Module) -> list[str] | None:
    names: list[str] | None = None
    for node in _top_statements(tree):
        if "__all__" not in _assigned(node):
            continue
        value = ast.literal_eval(node.value)  # type: ignore[attr-defined]
        names = (names or []) + list(value) if isinstance(node, ast.AugAssign) else list(value)
    return names


def _defined(tree: ast.Module) -> set[str]:
    return {name for node in _top_statements(tree) for name in _assigned(node)}


def _public_names(modules: dict[str, ast.Module]) -> set[tuple[str, str]]:
    """(module, name) of every public name of every public module: its ``__all__``, or
    else the public names it defines itself."""
    out = set()
    for module, tree in modules.items():
        if not _is_public(module) or module.endswith("__main__"):
            continue
        names = _all(tree)
        if names is None:
            names = [n for n in _defined(tree) if not n.startswith("_")]
        out.update((module, name) for name in names)
    return out


def _canonical(modules: dict[str, ast.Module], module: str, name: str) -> tuple[str, str]:
    """Where the object named *name* in *module* is defined, following imports."""
    seen = set()
    while (module, name) not in seen and module in modules:
        seen.add((module, name))
        source = _imports(module, modules[module]).get(name)
        if source is None:
            break
        module, name = source
    return module, name


def _split_target(modules: dict[str, ast.Module], target: str) -> tuple[str, str]:
    module, _, name = target.rpartition(".")
    while module and module not in modules:  # Class.member: document the class's module
        module, _, outer = module.rpartition(".")
        name = f"{outer}.{name}"
    return module, name


def _api_targets() -> list[tuple[str, str]]:
    """(file, dotted target) of every object the API reference documents."""
    targets = []
    for path in sorted(API_DIR.glob("*.rst")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            found = _OBJECT_DIRECTIVE.match(line)
            if found:
                targets.append((path.name, found.group(1).split("(")[0].strip()))
                indent = line.index("::") + 3
                for more in lines[i + 1:]:  # further signatures of the same directive
                    if more[:indent].strip() or not more[indent:].strip():
                        break
                    targets.append((path.name, more.strip().split("(")[0]))
                continue
            found = _MODULE_DIRECTIVE.match(line)
            if not found:
                continue
            module, members = found.group(1), ""
            for j in range(i + 1, len(lines)):
                option = lines[j]
                if option.startswith("   :members:"):
                    members = option.split(":members:", 1)[1]
                    for more in lines[j + 1:]:
                        if not more.startswith("      ") or more.strip().startswith(":"):
                            break
                        members += "," + more
                elif not option.startswith("   :"):
                    break
            targets.extend((path.name, f"{module}.{m}") for m in
                           re.split(r"[,\s]+", members.strip()) if m)
    return targets


def test_every_api_reference_target_exists():
    modules = _modules()
    missing = []
    for where, target in _api_targets():
        module, name = _split_target(modules, target)
        top = name.split(".")[0]
        if module not in modules or not (
                top in _defined(modules[module]) or top in _imports(module, modules[module])
                or top in (_all(modules[module]) or [])):
            missing.append(f"{where}: {target}")
    assert _api_targets(), "docs/api/*.rst documents nothing"
    assert not missing, f"the API reference names objects that do not exist: {missing}"


def test_every_public_name_is_in_the_api_reference():
    modules = _modules()
    documented = {_canonical(modules, *_split_target(modules, target))
                  for _, target in _api_targets()}
    public = _public_names(modules)
    assert ("morsock", "Server") in public and ("morsock.testing", "RawPeer") in public
    undocumented = sorted(f"{module}.{name}" for module, name in public
                          if _canonical(modules, module, name) not in documented)
    assert not undocumented, (
        f"public names missing from the API reference (docs/api/*.rst): {undocumented}")


def test_every_public_module_has_a_page():
    modules = _modules()
    text = "\n".join(p.read_text(encoding="utf-8") for p in API_DIR.glob("*.rst"))
    documented = set(re.findall(r"^\.\. (?:automodule|py:module):: ([\w.]+)", text, re.M))
    public = {m for m in modules if _is_public(m) and not m.endswith("__main__")}
    assert public - {"morsock"} <= documented, sorted(public - {"morsock"} - documented)


def test_readme_is_short():
    lines = (ROOT / "README.rst").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.rst has {len(lines)} lines; the manual belongs in docs/")


def test_settings_page_is_generated_and_current():
    """docs/guide/settings.rst is what docs/gen_settings.py writes from the settings now."""
    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "docs" / "gen_settings.py")
    assert spec is not None and spec.loader is not None
    gen_settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_settings)
    expected = gen_settings.render()
    page = (ROOT / "docs" / "guide" / "settings.rst").read_text(encoding="utf-8")
    assert page == expected, "stale: run python docs/gen_settings.py"
    assert re.search(r"\* - ``thread_pool_size``\n     - ``4``\n", page)


def test_docstrings_and_comments_stand_on_their_own():
    """No file of the package cites the maintainers' API.md, which users do not have."""
    citing = [f"{path.relative_to(PACKAGE)}:{number}"
              for path in sorted(PACKAGE.rglob("*")) if path.is_file() and path.suffix != ".pyc"
              for number, line in enumerate(
                  path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
              if "API.md" in line or "API §" in line]
    assert citing == [], f"cite a docs/ page or state the rule instead: {citing}"
def test_the_thread_of_on_handle_command_is_said_once_and_linked() -> None:
    guide = ROOT / "docs" / "guide"
    events = (guide / "events.rst").read_text()
    assert events.count(".. _handle-command-thread:") == 1
    assert "on_handle_command never runs on your thread" in events
    for page in ("components.rst", "client_lifecycle.rst", "reconnection.rst"):
        text = (guide / page).read_text()
        assert "<handle-command-thread>`" in text, page
        # no page may claim that every handler runs on the application's thread
        assert "the handlers run on your thread" not in text, page
