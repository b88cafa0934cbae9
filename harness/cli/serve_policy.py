"""``harness serve-policy``: the CPU test double of vLLM's server (``harness.policy.serve_policy``).

Decisions:

- Loopback only (no ``--allow-remote``): it is a test double with no login that reloads weights
  from any path a request names, so it has no business on a network.
- The socket is bound here before the model loads, so ``--port 0`` (any free port) prints the
  real URL and a port in use is one line; the "listening" line comes once the model is loaded, so
  a caller may wait for it (or for ``/health``).
"""

from __future__ import annotations

from typing import Optional

import typer

from harness.console import friendly
from harness.errors import ConfigError

__all__ = ["serve_policy_command"]


@friendly
def serve_policy_command(
    policy: str = typer.Option(..., "--policy", help="Model directory (save_pretrained) to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Loopback address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on, 0 to 65535 (0: any free port)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The name requests give as 'model' (default: --policy)."),
    max_logprobs: int = typer.Option(20, "--max-logprobs", help="Largest 'logprobs' a request may ask (vLLM's "
                                                                "default 20)."),
    logprobs_mode: str = typer.Option("processed_logprobs", "--logprobs-mode",
                                      help="processed_logprobs (of the tempered distribution, what the vllm "
                                           "engine needs) or raw_logprobs (untempered, vLLM's default)."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda for a quick look on a GPU."),
) -> None:
    """A CPU test double speaking the subset of vLLM 0.34's HTTP API that --rollout-engine vllm uses
    (completions with token ids, log-probs and top-K, pause/resume, weight reload, LoRA adapters),
    over the harness's own HF sampler. For tests; not a production server."""
    from harness.cli.view import bind_socket, is_loopback
    from harness.policy.serve_policy import load_policy_server, serve

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535 (0: any free port), got {port}")
    if not is_loopback(host):
        raise ConfigError(f"--host {host} is not loopback: serve-policy is a test double with no login that loads "
                          "weights from any path a request names; use 127.0.0.1")
    sock = bind_socket(host, port)
    try:
        server = load_policy_server(policy, served_model_name=served_model_name, max_logprobs=max_logprobs,
                                    logprobs_mode=logprobs_mode, device=device)
    except BaseException:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"harness serve-policy: http://{shown}:{sock.getsockname()[1]}/ serving {server.model_name} "
               "(vLLM test double on the HF sampler; Ctrl-C stops)")
    serve(server, sock)
