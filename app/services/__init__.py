"""Services: the gateway's logic, free of FastAPI so workers and tests can reuse it."""
