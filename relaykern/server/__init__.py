"""An OpenAI-compatible HTTP server over the relay engine (``relaykern serve``)."""
from relaykern.server.app import RelayServer, serve

__all__ = ["RelayServer", "serve"]
