"""The course "LLM do Zero", runnable: attention maps (`attention.py`) and a hardware check (`doctor.py`).

The guide that walks the course's stages lives in `docs/en/` and `docs/pt-BR/`.
"""
