"""`meshlm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Laid out like vLLM's entrypoints/openai: protocol (request / response schemas, OpenAI's
error shape), openai_format (engine tokens -> responses and stream chunks), routes, app
(auth, error handlers), streaming (client disconnects), engine_bridge (asyncio <-> engine
processes: admission, dispatch, faults), worker (the engine processes, tensor-parallel
lockstep), metrics (Prometheus text), server (uvicorn, SIGTERM drain), commands (the CLI).
HTTP types stay in this package: `meshlm.inference` knows nothing of them. See docs/serving.md.
"""
