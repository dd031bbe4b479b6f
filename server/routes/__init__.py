"""HTTP routes, one module per API family: OpenAI, LoRAX/TGI, task endpoints, adapter management, health.

Boundary: routes are thin. They validate bodies (`server.schemas`), tokenize and check limits
(`server.prompts`), lease adapters (`server.leases`), run generations (`server.streams`) and shape answers
in their API's wire format.
"""
