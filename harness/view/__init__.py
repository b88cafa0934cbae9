"""``harness view``: a local, read-only web viewer of the results database.

``create_app(Context(store, env_metrics, task_metrics))`` is a Starlette app serving the pages of
``harness.view.pages`` (runs, a run, an episode, compare) as HTML and, under ``/api``, as JSON.
The CLI (``harness.cli.view``) opens the store read-only and passes the env hooks, so this
package, like the rest of the kernel, imports no env.
"""

from harness.view.app import create_app
from harness.view.core import Context, ViewError

__all__ = ["create_app", "Context", "ViewError"]
