"""Bridges to other engines (Ray Data); each imports its engine only when used, never with `import tgems`."""
