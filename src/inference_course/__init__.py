"""Shared code of the course "Chapter 2: Efficient Inference & Serving".

Rooms: ``profiles`` (cpu/gpu sizes), ``models`` (the embedded model and other models), ``servers``
(managed vLLM / uvicorn / Prometheus processes), ``triton`` (the Triton server without Docker),
``notebooks`` (in-notebook helpers, the learner generator, ``make course``), ``doctor`` (the quick check).
Importing the package is cheap: nothing heavy is imported until a room is used.
"""
__version__ = "0.1.0"
