"""Connectors to outside systems: one module per system, re-exported by the public modules.

``rayflow.sinks`` and ``rayflow.sources`` import these modules at their end,
and these modules import the base classes from them. So that importing a
connector module directly works too, this package imports ``rayflow.sources``
and ``rayflow.sinks`` first (their re-exports then find the connector
module being imported fresh, not half-initialized).
"""

import rayflow.sources

# isort: split
import rayflow.sinks  # noqa: F401
