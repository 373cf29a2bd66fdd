"""An OpenAI-compatible HTTP server: `tinyllm serve` (or `python -m tinyllm.serve`).

    tinyllm serve --model PATH --device cpu --host 127.0.0.1 --port 8000

    POST /v1/completions        {"model", "prompt", "max_tokens", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}  (the checkpoint's chat template)
    GET  /v1/models             the one model served (GET /v1/models/{id}: that one, or 404)
    GET  /health                200 once the model is loaded and warmed up
    GET  /metrics               Prometheus text format

What it teaches: how a language model is served to many clients at once, and safely to
strangers. Read the modules in the order a request meets them:

    main.py        the flags; uvicorn's connection limits and timeouts; TLS
    middleware.py  a request id and a JSON 500 for any failure; CORS; the API key
    limits.py      the body: its size, its encoding, its nesting, its numbers
    openai.py      the OpenAI API's shapes: body -> validated job; events -> answers
    app.py         the Starlette app: the scheduler's thread behind an event loop that never blocks
    engine_process.py  the model and its scheduler in a process of their own (--engine-process,
                   the GPU's default): requests and each round's events cross a pipe, from
                   one or several HTTP processes (--http-processes)
    metrics.py     what the server reports at /metrics (kept by the engine process, if any)
    routing.py     replicas: which one takes a request (least loaded, or by prompt prefix)
    replicas.py    N replicas on Ray Serve behind one endpoint: `python -m tinyllm.replicas`

The model runs in one scheduler thread (tinyllm/scheduler.py) that batches every running
request into each decode step: on the CPU through the readable forward pass, on a GPU with
the fast path as batched steps replayed from CUDA graphs.

Why Starlette and uvicorn (and not FastAPI): Starlette is the small ASGI toolkit FastAPI
is built on; uvicorn is the standard ASGI server. FastAPI would add pydantic models and
an OpenAPI schema. Here every field is checked by hand anyway, because the checks must
name the field the OpenAI way and reuse tinyllm's own validation (SamplingParams,
StopRules), so the extra layer would only hide the request handling this package shows.
"""


def __getattr__(name):
    # Server needs starlette (the `serve` extra); imported when asked for, so that
    # `python -m tinyllm.serve` can say which package is missing instead of failing here.
    if name == "Server":
        from .app import Server

        return Server
    raise AttributeError(name)
