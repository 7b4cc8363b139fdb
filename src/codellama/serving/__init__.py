"""``codellama serve``: a continuous-batching engine behind an OpenAI- and llama.cpp-compatible HTTP API
(needs the ``serve`` extra: fastapi and uvicorn).

- ``scheduler``: the engine thread (one KV cache of ``max_batch_size`` rows; one request's failure is its own);
- ``sequences``: what it runs (``Sequence``, ``Event``) and how a task becomes sequences;
- ``app``: the app (auth, error handling, metrics) with one router per protocol: ``openai_api`` and
  ``llamacpp_api``, on ``core.Serving`` (jobs to sequences and back); ``schema``: reading and checking OpenAI
  bodies; ``models``: pydantic models of llama.cpp's bodies; ``errors``: the one place where exceptions
  become OpenAI-style error responses; ``metrics``: Prometheus (``prometheus_client``); ``server``: uvicorn,
  limits (body timeout, connection cap).

From Python::

    import codellama
    from codellama.serving.app import create_app, serve, running_server

    llama = codellama.load("path/to/checkpoint")
    serve(create_app(llama, max_batch_size=16), "127.0.0.1", 8080)   # blocks, like the CLI
    with running_server(create_app(llama)) as url:                   # a free loopback port, in a thread
        ...
"""
