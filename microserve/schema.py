"""JSON-schema rewriting shared by structured outputs and tool calls (no torch, no grammar library)."""

from __future__ import annotations


def closed(schema):
    """The schema with `additionalProperties: false` wherever an object lists its properties
    and says nothing of others (as OpenAI's strict mode and xgrammar's default do): open
    objects let a small model wander into invented keys until max_tokens runs out."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out
