"""Inspection rules: pure checks over what upstreams send back and what they declare.

Each module is one concern and takes values, returns values — no I/O, no clock of its own:
`hits` (what a rule found in a string), `tenants` (objects of another tenant), `secrets`
(keys, tokens, personal data), `injection` (instructions aimed at the model), `pins` (tool,
prompt and template definitions as first seen), `poisoning` (descriptions that instruct the
model, names that shadow another upstream's). `content` walks a message's strings and
withholds items; `text` gives the readings of a string a rule must see through (escapes,
look-alikes); `trust` is the port to the pins and quarantines the registry keeps;
`answer` judges one message with all of them. The inspection stage of the pipeline
(`bastion.pipeline.inspection`) applies them.
"""

__all__ = [
    "answer",
    "content",
    "hits",
    "injection",
    "pins",
    "poisoning",
    "secrets",
    "tenants",
    "text",
    "trust",
]
