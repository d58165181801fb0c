"""Generate the CLI and the config reference pages (mkdocs-gen-files runs this at every ``mkdocs build``).

* ``reference/cli.md``: the Typer app of ``vocdet/cli.py`` as the click command tree ``typer.main.get_command``
  builds from it, the same objects ``vocdet --help`` prints: every command and group with its usage line, its help
  text and a table of its arguments and options (type, default, range, help).
* ``reference/config.md``: the schema, the dataclasses of ``vocdet/config.py``, walked with ``dataclasses.fields``:
  every key as its dotted path with its type, default and help, one table per section.

Nothing on these pages is written by hand: a new option, key or help text shows up at the next build. The file
itself is left out of the built site (``exclude_docs`` in mkdocs.yml). Run it alone to print both pages:
``python docs/gen_ref.py``.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import re
import sys
import typing
from collections.abc import Iterator
from typing import Any

import typer
import yaml

import vocdet.cli
import vocdet.config

CLI_PAGE = "reference/cli.md"
CONFIG_PAGE = "reference/config.md"
GENERATED = (
    "Generated from {source} by `docs/gen_ref.py` at every build of this site: do not edit, "
    "change the source and rebuild."
)

# ---------------------------------------------------------------------------------------------------- Markdown


_CODE_SPAN = re.compile(r"(``.+?``|`[^`\n]+`)")
_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def text(s: str | None) -> str:
    """Prose from a help string or docstring as Markdown: its code spans kept, reST roles as code spans, and every
    other character that Markdown or HTML would read as markup (``<run>``, ``predict.*``, ``a|b``) escaped."""
    if not s:
        return ""
    s = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", s)
    parts = _CODE_SPAN.split(s)
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = _SPECIAL.sub(r"\\\1", html.escape(parts[i], quote=False))
    return "".join(parts)


def paragraphs(s: str | None) -> list[str]:
    """A docstring's paragraphs, each on one line (a wrapped help text reads as one paragraph)."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(s or "")) if p.strip()]


def cell(s: str) -> str:
    """One table cell: one line."""
    return " ".join(s.split()) or "—"


def code(value: str) -> str:
    """``value`` as an inline code span (longer fences when it holds backticks)."""
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def anchor(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


# ---------------------------------------------------------------------------------------------------- CLI


def commands(cmd: Any, ctx: Any) -> Iterator[tuple[Any, Any]]:
    """``(command, context)`` for ``cmd`` and, depth first in the order ``--help`` lists them, every visible
    subcommand; ``ctx.command_path`` is the full name (``vocdet data synth``)."""
    yield cmd, ctx
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from commands(sub, sub.context_class(sub, info_name=name, parent=ctx))


def root_context() -> tuple[Any, Any]:
    """The click command Typer builds from ``vocdet.cli.app`` and its context, named as the console script."""
    cmd = typer.main.get_command(vocdet.cli.app)
    return cmd, cmd.context_class(cmd, info_name="vocdet")


def param_type(p: Any, ctx: Any) -> str:
    if getattr(p, "is_flag", False):
        return "flag"
    display = getattr(p, "display_type", None)  # Typer's own parameters
    name = display(ctx) if callable(display) else getattr(getattr(p, "type", None), "name", "")
    name = str(name).strip("<>")
    if getattr(p, "multiple", False) and not name.startswith("list["):
        name += ", repeatable"
    return name


def param_range(p: Any) -> str:
    lo = getattr(p, "min", None)
    hi = getattr(p, "max", None)
    if lo is None and hi is None:  # plain click keeps the range on its type
        lo, hi = getattr(getattr(p, "type", None), "min", None), getattr(getattr(p, "type", None), "max", None)
    if lo is not None and hi is not None:
        return f"{lo} ≤ x ≤ {hi}"
    if lo is not None:
        return f"x ≥ {lo}"
    if hi is not None:
        return f"x ≤ {hi}"
    return ""


def param_default(p: Any) -> str:
    if p.required:
        return "required"
    if getattr(p, "show_default", True) is False:
        return "—"
    default = p.default
    if getattr(p, "is_flag", False):
        if p.secondary_opts and default is not None:
            return code(p.opts[-1] if default else p.secondary_opts[-1])
        if not p.secondary_opts:
            return "on" if default else "off"
        return "—"
    if default is None or default == () or default == []:
        return "—"
    if isinstance(default, (list, tuple)):
        return code(" ".join(map(str, default)))
    return code(str(default))


def param_names(p: Any) -> str:
    if p.param_type_name == "argument":
        return code(p.name + ("..." if p.nargs == -1 else ""))

    def short_first(group: list[str]) -> list[str]:  # -c, --config: as --help lists them
        return sorted(group, key=lambda o: len(o) - len(o.lstrip("-")))

    return code(" / ".join(", ".join(short_first(group)) for group in (p.opts, p.secondary_opts) if group))


def param_help(p: Any) -> str:
    out = text(getattr(p, "help", None) or "")
    if rng := param_range(p):
        out += f" Range: {code(rng)}."
    return out


def cli_page() -> str:
    root, root_ctx = root_context()
    lines = [
        "# CLI reference",
        "",
        '!!! info "Generated"',
        "    " + GENERATED.format(source="the Typer app in `vocdet/cli.py`"),
        "",
    ]
    lines += [text(p) + "\n" for p in paragraphs(root.help)]
    lines += [text(p) + "\n" for p in paragraphs(vocdet.cli.__doc__)[1:]]  # the first one names the module
    rows = [
        [f"[{code(ctx.command_path)}](#{anchor(ctx.command_path)})", text(cmd.get_short_help_str(limit=300))]
        for cmd, ctx in commands(root, root_ctx)
        if cmd is not root
    ]
    lines += table(["Command", "What it does"], rows)
    lines += [
        f"Every command also takes {code('--help')} (its usage and options, as below) and prints errors as one "
        "line on stderr with exit code 2.",
        "",
    ]
    for cmd, ctx in commands(root, root_ctx):
        if cmd is root:
            continue
        depth = ctx.command_path.count(" ")  # vocdet train: 1, vocdet data synth: 2
        lines += [f"{'#' * (depth + 1)} {code(ctx.command_path)} {{#{anchor(ctx.command_path)}}}", ""]
        lines += [text(p) + "\n" for p in paragraphs(cmd.help)]
        usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
        lines += ["```console", f"$ {usage}", "```", ""]
        if hasattr(cmd, "list_commands"):
            subs = [
                [f"[{code(sctx.command_path)}](#{anchor(sctx.command_path)})", text(sub.get_short_help_str(300))]
                for sub, sctx in commands(cmd, ctx)
                if sub is not cmd and sctx.parent is ctx
            ]
            lines += ["**Commands**", "", *table(["Command", "What it does"], subs)]
        params = [p for p in cmd.params if not getattr(p, "hidden", False)]
        for kind, title in (("argument", "Arguments"), ("option", "Options")):
            rows = [
                [param_names(p), code(param_type(p, ctx)), param_default(p), param_help(p)]
                for p in params
                if p.param_type_name == kind
            ]
            if rows:
                lines += [f"**{title}**", "", *table([title[:-1], "Type", "Default", "Description"], rows)]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- Config


def type_name(f: dataclasses.Field[Any]) -> str:
    """A field's annotation as written in the schema (``str | None``, ``list[str]``)."""
    if isinstance(f.type, str):
        return f.type
    return re.sub(r"\btyping\.", "", getattr(f.type, "__name__", None) or repr(f.type))


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def yaml_value(value: Any) -> str:
    """``value`` as it is written in a config file or a ``KEY=VALUE`` override (one line of YAML)."""
    out = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True)
    return out.strip().removesuffix("...").strip()


@dataclasses.dataclass
class Section:
    path: str  # dotted: run, data, data.synth, trainer
    help: str
    keys: list[tuple[str, str, str, str]]  # (dotted key, type, default as YAML, help)
    subsections: list[tuple[str, str]]  # (dotted path, the field's help)


def sections(cls: type = vocdet.config.Config, prefix: str = "") -> list[Section]:
    """Every section of the schema, in source order, a section's nested sections right after it.

    A field whose type is a dataclass is a section (its help: the class docstring, else the field's). A field of
    the root whose default is a non-empty mapping (``trainer``: free-form keyword arguments of lightning.Trainer) is
    a section of the keys the schema gives it, with their help from ``vocdet.config.schema_help()``."""
    out: list[Section] = []
    hints = typing.get_type_hints(cls)
    top = Section(prefix.rstrip("."), "", [], [])
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        help_ = f.metadata.get("help", "")
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            nested = sections(hint, key + ".")
            nested[0].help = inspect.getdoc(hint) or help_
            top.subsections.append((key, help_))
            out += nested
            continue
        default = default_of(f)
        if not prefix and isinstance(default, dict) and default:
            helps = vocdet.config.schema_help()
            keys = [(f"{key}.{k}", "Any", yaml_value(v), helps.get(f"{key}.{k}", "")) for k, v in default.items()]
            out.append(Section(key, help_, keys, []))
            continue
        shown = "required" if default is dataclasses.MISSING else yaml_value(default)
        top.keys.append((key, type_name(f), shown, help_))
    if top.keys or top.subsections:
        out.insert(0, top)
    return out


def config_page() -> str:
    secs = [s for s in sections() if s.path]
    lines = [
        "# Config reference",
        "",
        '!!! info "Generated"',
        "    " + GENERATED.format(source="the schema in `vocdet/config.py`"),
        "",
    ]
    lines += [text(p) + "\n" for p in paragraphs(vocdet.config.__doc__)]
    lines += [
        "Every key below is set the same three ways: in a YAML file given with "
        f"{code('--config')} (nested as the dots say), as a dotted override on the command line "
        f"({code('vocdet train data.imgsz=320')}), or in Python "
        '(`vocdet.load_config(["my.yaml"], ["data.imgsz=320"])`).',
        "",
    ]
    lines += table(
        ["Section", "Keys", "What it holds"],
        [
            [f"[{code(s.path)}](#{anchor(s.path)})", str(len(s.keys)), text(paragraphs(s.help)[0] if s.help else "")]
            for s in secs
        ],
    )
    for s in secs:
        depth = s.path.count(".")
        lines += [f"{'#' * (depth + 2)} {code(s.path)} {{#{anchor(s.path)}}}", ""]
        lines += [text(p) + "\n" for p in paragraphs(s.help)]
        rows = [[code(k), code(t), code(d), text(h)] for k, t, d, h in s.keys]
        rows += [
            [f"[{code(sub)}](#{anchor(sub)})", "section", "—", text(help_ or "a section") + " (below)"]
            for sub, help_ in s.subsections
        ]
        lines += table(["Key", "Type", "Default", "Help"], rows)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    import mkdocs_gen_files

    for page, render in ((CLI_PAGE, cli_page), (CONFIG_PAGE, config_page)):
        with mkdocs_gen_files.open(page, "w") as fh:
            fh.write(render())


if __name__ == "<run_path>":  # mkdocs-gen-files runs the file with runpy.run_path
    main()
elif __name__ == "__main__":  # python docs/gen_ref.py: print both pages
    sys.stdout.write(cli_page() + "\n" + config_page())
