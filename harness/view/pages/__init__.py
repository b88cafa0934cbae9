"""The viewer's pages, one module each (a ``PAGE``); ``PAGES`` is the order the app mounts them.
Adding a page: write its module and template, and list it here."""

from harness.view.pages import compare, credit, episode, group, run, runs, training

PAGES = [runs.PAGE, run.PAGE, episode.PAGE, compare.PAGE, group.PAGE, training.PAGE, credit.PAGE]

__all__ = ["PAGES"]
