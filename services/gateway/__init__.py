"""sd-gateway: AUTOMATIC1111's /sdapi/v1 HTTP API in front of the Triton pipeline, so A1111 clients
(webuiapi, Open WebUI, SillyTavern, Dify, ...) work unchanged. It holds no model: each request is forwarded to
Triton over gRPC with the project's own client (client.api.StableDiffusionClient).

Modules: `models` (the request bodies, as lenient as A1111's), `translate` (A1111 fields to pipeline inputs
and the pipeline's result to A1111's response), `app` (the FastAPI routes, auth, limits, errors), `cli`
(the sd-gateway command).
"""
