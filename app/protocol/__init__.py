"""Wire models (pydantic) for the public and admin APIs."""
