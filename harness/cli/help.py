"""Help pages that read at 80 columns.

Why not typer's rich help: its option table gives every column a share of the width, so at 80
columns long option names were cut (``--eval-temperat…``) and help text squeezed into a narrow
column; and it shows a value type for every option, flags included (``--resume <bool>``).

Decisions: click's plain layout (``rich_markup_mode=None`` on the app): an option's names are
never cut, its help wraps beside it or starts on the next line when the names are long, and a
flag shows no value. Typer's plain layout drops the option groups (``rich_help_panel``: "Env
settings", "Method settings"), so ``GroupedHelpCommand`` keeps them as sections.
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand

__all__ = ["GroupedHelpCommand", "use_grouped_help"]


class GroupedHelpCommand(TyperCommand):
    """A command whose plain help lists its options under their ``rich_help_panel`` titles."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:  # hidden
                continue
            if param.param_type_name == "argument":
                title = "Arguments"
            else:
                title = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def use_grouped_help(app: typer.Typer) -> None:
    """Every command of ``app`` and of its sub-apps (an env's own commands included) renders its
    help with ``GroupedHelpCommand``; call once every command is registered."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):  # not a command that chose its own class
            info.cls = GroupedHelpCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_grouped_help(group.typer_instance)
