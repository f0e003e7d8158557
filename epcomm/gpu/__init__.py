"""The GPU backend: one shared context (context.py), one launcher per kernel family (layout.py, intranode.py,
low_latency.py), and the backend that builds the families a Buffer asked for (backend.py). Importing loads no CuPy."""
