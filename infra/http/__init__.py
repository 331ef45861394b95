"""The HTTP entry point: the FastAPI app (app.py: OpenAI-compatible chat, the native routes,
the read side), the knowledge and workflow routes, and who may call what (security.py). May
import everything below it in infra; never cli."""
