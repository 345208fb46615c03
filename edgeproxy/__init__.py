"""edgeproxy: a self-hosted LLM API gateway."""
