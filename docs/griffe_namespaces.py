"""A Griffe extension for the API reference (mkdocs.yml: mkdocstrings' ``extensions``).

1. vocdet's subpackages (``vocdet/core``, ``vocdet/infer``, ...) have no ``__init__.py``: Python imports them as
   namespace packages, but Griffe skips folders without one below a regular package, so the public names that
   ``vocdet/__init__.py`` re-exports from them (``vocdet.Detector`` -> ``vocdet.infer.detector.Detector``) could not
   be resolved. Before Griffe walks the package's submodules, this adds each such folder as a module, so the files
   inside load as ``vocdet.core.detections`` and so on, exactly as Python names them.
2. The docstrings use a few reST constructs (``:func:`name```, ``:class:`~pkg.Name```, a paragraph ending in
   ``::`` before a literal block). They are rewritten to Markdown (code spans; a single colon) for the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _namespace_dirs(folder: Path) -> list[Path]:
    return [
        d
        for d in sorted(folder.iterdir())
        if d.is_dir() and d.name.isidentifier() and not (d / "__init__.py").exists() and any(d.glob("*.py"))
    ]


def _role(m: re.Match[str]) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"  # ~pkg.mod.Name shows Name, as Sphinx does


def _markdown(text: str) -> str:
    text = _ROLE.sub(_role, text)
    return _LITERAL.sub(r"\1:", text)


class NamespaceSubpackages(griffe.Extension):
    """Load ``__init__``-less subfolders of a package as its subpackages; reST roles in docstrings as code."""

    def on_module_instance(self, *, node: Any, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        # Runs while a module is visited, before its submodules are loaded: for a package (an __init__.py), and
        # recursively for the folders added here (Griffe then finds their files in its own walk of the package).
        filepath = mod.filepath
        if not isinstance(filepath, Path) or filepath.name != "__init__.py":
            return
        self._add(mod, filepath.parent)

    def _add(self, parent: griffe.Module, folder: Path) -> None:
        for d in _namespace_dirs(folder):
            if d.name in parent.members:
                continue
            sub = griffe.Module(
                d.name,
                filepath=[d],
                parent=parent,
                lines_collection=parent.lines_collection,
                modules_collection=parent.modules_collection,
            )
            parent.set_member(d.name, sub)
            self._add(sub, d)

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)
