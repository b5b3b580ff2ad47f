"""The bottom layers of affectnet-plus: the schema and fold rule (``core.schema``) and Hub I/O (``core.hub``).

Nothing here imports ``builder`` or ``models``; everything else may import this."""
