"""``codellama serve``: a continuous-batching engine (``scheduler``) behind an OpenAI- and llama.cpp-compatible
HTTP API (``app``, needs the ``serve`` extra: fastapi and uvicorn).

From Python::

    import codellama
    from codellama.serving.app import create_app, serve, running_server

    llama = codellama.load("path/to/checkpoint")
    serve(create_app(llama, max_batch_size=16), "127.0.0.1", 8080)   # blocks, like the CLI
    with running_server(create_app(llama)) as url:                   # a free loopback port, in a thread
        ...
"""
