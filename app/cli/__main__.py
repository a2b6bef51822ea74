"""`python -m app.cli` (the guard matters: vLLM spawns engine processes that re-import __main__)."""

from app.cli import main

if __name__ == "__main__":
    main()
