"""The pure record engine: Arrow batches in, Arrow batches out.

A pipeline version's step list compiles once into one DuckDB query over the
batch (see ``docs/transforms.md``). Nothing here imports Django.
"""

from __future__ import annotations

from transforms.engine.compiler import (
    CompiledPipeline,
    EngineResult,
    compile_steps,
    merge_partials,
)
from transforms.engine.exceptions import (
    EngineError,
    EngineInterrupted,
    InputSchemaError,
    StepConfigError,
)
from transforms.engine.expressions import expression_columns
from transforms.engine.steps import KeyScope

__all__ = [
    "CompiledPipeline",
    "EngineError",
    "EngineInterrupted",
    "EngineResult",
    "InputSchemaError",
    "KeyScope",
    "StepConfigError",
    "compile_steps",
    "expression_columns",
    "merge_partials",
]
