"""``codellama serve``: a continuous-batching engine (``scheduler``) behind an OpenAI- and llama.cpp-compatible
HTTP API (``app``, needs the ``serve`` extra: fastapi and uvicorn)."""
