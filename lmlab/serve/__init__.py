"""``lmlab serve``: an OpenAI-compatible HTTP server with continuous batching, limits, keys, metrics and a
web playground. ``lmlab.serve(checkpoint, port=8000)`` runs it; :func:`create_app` builds the FastAPI
application around a loaded :class:`lmlab.api.LM` (for tests, or to mount in an application of your own)."""

from lmlab.verb import make_callable

make_callable(__name__, "lmlab.serve.server", "serve")  # lmlab.serve(checkpoint, …) is the verb
