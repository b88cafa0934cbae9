"""AppWorld env adapter: ``client`` (async HTTP client for one ``appworld serve environment``
server), ``env`` (the registered ``appworld`` env, ``StaticServers``). The harness never imports
``appworld`` itself. Nothing is imported here so that ``import envs.appworld.<module>`` stays cheap
(``client`` pulls in ``harness.llm`` and with it litellm)."""

__all__: list[str] = []
