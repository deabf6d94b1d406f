"""Serving, floor 4: an OpenAI-compatible HTTP server over the continuous-batching engine (the
`serve` extra: pip install -e '.[serve]'). `python -m moe.serve --help` starts one.

    loop      the engine stepping in its own thread; requests join and leave between steps
    metrics   what /metrics reports, in Prometheus' text format
    api       the OpenAI API (FastAPI): completions, chat completions, streaming, errors
    process   a server as a child process on 127.0.0.1 (tests and `bench.py serve`)
"""
