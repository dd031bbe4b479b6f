"""HTTP routes, one module per API family: OpenAI, LoRAX/TGI, task endpoints, adapter management, health.

Boundary: routes are thin. They validate bodies (`server.schemas`), check limits (`server.prompts`), lease
adapters and run generations through `server.dispatch`, and shape answers in their API's wire format.
"""
