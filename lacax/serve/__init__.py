"""`lacax serve`: an OpenAI-compatible HTTP server over lacax generation.

  lacax serve                                  # the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
  lacax serve --model=/path/to/checkpoint --cache-policy=streaming --cache-size=512 --port=8001
  python -m lacax.serve ...                    # the same command line

`serving.Service` starts the same server inside a process (a background thread; port 0 picks a free port),
which is how tests and benchmarks talk to a real server on 127.0.0.1. The batching policy is described in
`lacax.serve.engine`, the API in `lacax.serve.app`.
"""

from lacax.serve.serving import Service, main, serve  # noqa: F401
