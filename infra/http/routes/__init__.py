"""The API's routes, one module per area (ops, chat, contexts, admin, ingest and the request
log), each an `add_routes(app, api)` that binds them to the API's collaborators (deps.Api).

No module here has `from __future__ import annotations`: FastAPI evaluates a route's
annotations in its module's globals only, and `Depends(caller)` names a local of add_routes.
"""
